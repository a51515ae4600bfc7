"""Relations between the samples of a batch, compared between teacher and student: similarity-preserving KD and
probabilistic knowledge transfer. Both compare ``[B, B]`` matrices, so the two layers' widths and sizes may
differ and no adapter is needed.

Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, eq. 2-4): with
Q the layer's output flattened to ``[B, C*H*W]``, G = Q Q^T with each row L2-normalised,

    L_SP = ||G_t - G_s||_F^2 / B^2.

Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018): with f the features (a feature map is first averaged over its positions: the pooled
features the authors' benchmark code reads), each row L2-normalised, the cosine similarities turned into
conditional probabilities p_{i|j} = (1 + cos_ij) / sum_k (1 + cos_ik) (the cosine kernel, eq. 10),

    L_PKT = mean over i, j of  p^t_{i|j} * log( (p^t_{i|j} + eps) / (p^s_{i|j} + eps) ),   eps = 1e-7,

a KL divergence averaged over the B^2 entries, as in the authors' code (diagonal included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .regression import pooled


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    b = student.shape[0]
    if teacher.shape[0] != b:
        raise ValueError(f"similarity-preserving KD: batch sizes differ ({b} and {teacher.shape[0]})")
    fs, ft = student.reshape(b, -1).float(), teacher.detach().reshape(b, -1).float()
    gs = F.normalize(fs @ fs.T, dim=1)
    gt = F.normalize(ft @ ft.T, dim=1)
    return (gt - gs).pow(2).sum() / (b * b)


def _pkt_probabilities(f: torch.Tensor, eps: float) -> torch.Tensor:
    f = pooled(f)
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    sim = (f @ f.T + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"PKT: batch sizes differ ({student.shape[0]} and {teacher.shape[0]})")
    ps = _pkt_probabilities(student.float(), eps)
    with torch.no_grad():
        pt = _pkt_probabilities(teacher.detach().float(), eps)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


class SPLoss(nn.Module):
    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return sp_loss(student, teacher)


class PKTLoss(nn.Module):
    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return pkt_loss(student, teacher)
