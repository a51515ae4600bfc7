"""DIST: distillation by correlation (Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger
Teacher", NeurIPS 2022).

The student matches the teacher's predictions up to a linear relation, not exactly: with Y = softmax(Z / tau)
for a batch (rows samples, columns classes) and the Pearson correlation rho,

    inter-class:  L_inter = 1 - (1/B) sum_i rho(Y_s[i, :], Y_t[i, :])     (each sample's ranking of classes)
    intra-class:  L_intra = 1 - (1/K) sum_j rho(Y_s[:, j], Y_t[:, j])     (each class's ranking of samples)
    L_DIST = tau^2 * (beta * L_inter + gamma * L_intra),

the authors' ImageNet setting beta = gamma = tau = 1. Dense outputs ``[B, K, H, W]`` count every pixel as a
row, as in the authors' segmentation code. rho is the cosine of the centred vectors, with 1e-8 added to the
product of norms as in their code.
"""

from __future__ import annotations

import torch

from .kd import as_rows


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_inter, L_intra)``, each multiplied by tau^2."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; do teacher and student have the same classes?")
    ys = torch.softmax(as_rows(student_logits.float()) / tau, dim=1)
    yt = torch.softmax(as_rows(teacher_logits.detach().float()) / tau, dim=1)
    inter = 1 - pearson_rows(ys, yt).mean()
    intra = 1 - pearson_rows(ys.T, yt.T).mean()
    return inter * tau * tau, intra * tau * tau


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0) -> torch.Tensor:
    inter, intra = dist_terms(student_logits, teacher_logits, tau)
    return beta * inter + gamma * intra
