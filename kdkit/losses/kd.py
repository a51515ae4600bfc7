"""Soft-target distillation loss (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

    L_KD = s(T) * KL( softmax(z_t / T) || softmax(z_s / T) )
         = s(T) * (1/B) * sum_b sum_k p_t[b,k] * (log p_t[b,k] - log p_s[b,k])

with s(T) = T^2 (Hinton's scale, the default), which keeps the gradient's magnitude independent of T where
the soft targets are nearly uniform (high T, logits close): there dL/dz_s = (z_s - z_t) / K. Early in
training, when a confident teacher's soft targets are far from the student's, the gradient is
dL/dz_s = s(T)/T * (p_s - p_t): with T^2 it is T times a cross-entropy's, which is why KD at the student's
own learning rate can diverge. ``scale="t"`` (s(T) = T) bounds it like a cross-entropy's at every T.

Logit standardisation (Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation", CVPR
2024): with ``standardize``, each logit vector is replaced by (z - mean(z)) / std(z) before the
temperature, so the student matches the shape of the teacher's logits, not their magnitude.

Dense outputs ``[B, K, H, W]`` (segmentation) are soft targets per pixel ("pixel-wise distillation", Liu et
al., CVPR 2019): every position is one sample, and the loss is the mean over the B*H*W positions.

The teacher's logits are treated as constants (detached).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

KDScale = Literal["t2", "t"]


def standardized(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(z - mean(z)) / std(z) over the classes of each row (Sun et al., CVPR 2024)."""
    z = z.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def as_rows(z: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, K, ...]`` as rows ``[B * ..., K]``: one row per sample, or per position of a dense output."""
    return z if z.dim() == 2 else z.movedim(1, -1).reshape(-1, z.shape[1])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            scale: KDScale = "t2", standardize: bool = False) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; do teacher and student have the same number of classes?"
        )
    t = temperature
    zs, zt = as_rows(student_logits.float()), as_rows(teacher_logits.detach().float())
    if standardize:
        zs, zt = standardized(zs), standardized(zt)
    log_p_s = F.log_softmax(zs / t, dim=1)
    log_p_t = F.log_softmax(zt / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t if scale == "t2" else t)


class KDLoss(nn.Module):
    def __init__(self, temperature: float = 4.0, scale: KDScale = "t2", standardize: bool = False):
        super().__init__()
        self.temperature, self.scale, self.standardize = temperature, scale, standardize

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature, self.scale, self.standardize)
