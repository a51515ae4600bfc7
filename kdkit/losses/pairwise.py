"""Structured pair-wise similarity distillation (Liu, Chen, Liu, Qin, Luo & Wang, "Structured Knowledge
Distillation for Semantic Segmentation", CVPR 2019).

The feature map is max-pooled into A = H' x W' nodes (kernel and stride ``int(scale * H)`` by ``int(scale *
W)``, ceil mode: with scale 0.5, a 2x2 grid), and the similarity of nodes i and j is the cosine of their
feature vectors, a_ij = f_i^T f_j / (||f_i|| ||f_j||). The student matches the teacher's similarities (Eq. 1):

    L_pa = 1 / (N * A^2) * sum_n sum_i sum_j (a^s_ij - a^t_ij)^2

As in the authors' code, the norms ||f|| are treated as constants in the backward pass (detached, plus 1e-8),
and the pooling kernel is taken from the teacher's map. The channel counts may differ (similarities are A x A
whatever the width); a student map of another spatial size is max-pooled to the teacher's grid of nodes
(adaptive pooling), which the authors' code, with maps of one size, does not need. Their segmentation setting weights it
0.5 (lambda_pa) beside pixel-wise distillation at 10.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def similarity(feat: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[N, A, A]`` between the positions of ``feat [N, C, H, W]`` (norms detached)."""
    feat = feat.float()
    norm = feat.pow(2).sum(dim=1, keepdim=True).sqrt().detach() + 1e-8
    f = (feat / norm).flatten(2)
    return torch.einsum("bci,bcj->bij", f, f)


def pool_nodes(feat: torch.Tensor, size: tuple[int, int], scale: float) -> torch.Tensor:
    """Max-pool `feat` into nodes with the kernel a map of spatial `size` gets at `scale` (at least 1)."""
    kh, kw = max(1, int(size[0] * scale)), max(1, int(size[1] * scale))
    return F.max_pool2d(feat, kernel_size=(kh, kw), stride=(kh, kw), ceil_mode=True)


def pairwise_loss(student: torch.Tensor, teacher: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """L_pa between feature maps ``[N, C_s, H, W]`` and ``[N, C_t, H, W]`` (the teacher's detached)."""
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"pair-wise similarity compares feature maps [N, C, H, W]; got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    size = (teacher.shape[2], teacher.shape[3])
    pt = pool_nodes(teacher.detach(), size, scale)
    if student.shape[2:] == teacher.shape[2:]:
        ps = pool_nodes(student, size, scale)
    else:  # another resolution: max-pooled to the teacher's grid of nodes
        ps = F.adaptive_max_pool2d(student, tuple(pt.shape[2:]))
    sim_s, sim_t = similarity(ps), similarity(pt)
    a = pt.shape[2] * pt.shape[3]
    return ((sim_t - sim_s) ** 2).sum() / (a * a) / teacher.shape[0]


class PairwiseLoss(nn.Module):
    def __init__(self, scale: float = 0.5):
        super().__init__()
        self.scale = scale

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return pairwise_loss(student, teacher, self.scale)
