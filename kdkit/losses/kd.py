"""Soft-target distillation loss (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

    L_KD = T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )
         = T^2 * (1/B) * sum_b sum_k p_t[b,k] * (log p_t[b,k] - log p_s[b,k])

The T^2 factor keeps the gradient magnitude independent of the temperature. The teacher's logits are
treated as constants (detached).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; do teacher and student have the same number of classes?"
        )
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class KDLoss(nn.Module):
    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature)
