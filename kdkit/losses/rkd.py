"""Relational knowledge distillation (Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019).

The student matches the teacher's *relations* between the embeddings of a batch, not the embeddings themselves:

    distance:  psi_D(t_i, t_j) = ||t_i - t_j|| / mu,   mu = mean of ||t_i - t_j|| over the pairs i != j
               L_D = mean over (i, j) of huber( psi_D(s_i, s_j), psi_D(t_i, t_j) )
    angle:     psi_A(t_i, t_j, t_k) = < e_ij, e_kj >,   e_ij = (t_i - t_j) / ||t_i - t_j||
               L_A = mean over (i, j, k) of huber( psi_A(s), psi_A(t) )

with huber the smooth L1 loss (delta 1), each model's distances normalised by its own mean; the teacher's
relations are constants. The authors' weights for metric learning: 25 (distance) and 50 (angle). Widths may
differ: only distances and angles are compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``[N, N]`` between rows (the squared form clamped at `eps` before the root; 0 on the
    diagonal)."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = student.flatten(1).float(), teacher.detach().flatten(1).float()
    with torch.no_grad():
        dt = pairwise_distances(t)
        dt = dt / dt[dt > 0].mean()
    ds = pairwise_distances(s)
    ds = ds / ds[ds > 0].mean()
    return F.smooth_l1_loss(ds, dt)


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [N, N, C]: e_j - e_i, unit
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = student.flatten(1).float(), teacher.detach().flatten(1).float()
    with torch.no_grad():
        at = _angles(t)
    return F.smooth_l1_loss(_angles(s), at)


class RKDLoss(nn.Module):
    """Distance and angle terms at the authors' ratio (25 : 50), L_D + angle_ratio * L_A, on features flattened
    per sample; a loss on a layer pair, for the ``rkd`` path of ``adaptive``."""

    def __init__(self, angle_ratio: float = 2.0):
        super().__init__()
        self.angle_ratio = angle_ratio

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_distance(student, teacher) + self.angle_ratio * rkd_angle(student, teacher)
