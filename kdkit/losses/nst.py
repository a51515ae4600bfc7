"""Neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", 2017): the squared maximum mean discrepancy between the distributions of the two networks'
channels, each channel's spatial map being one sample.

    f_c = vec(F_c) / ||vec(F_c)||_2                        (channel c's map, L2-normalised; H*W values)
    k(a, b) = (a . b + c)^d                                (polynomial kernel; the paper's choice d=2, c=0)
    MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(t_i, s_j)

averaged over the batch. The channel counts may differ (no adapter needed); the spatial sizes must match,
since the samples live in R^{H*W}. For the Gram-matrix regression that the Adaptive Distillation code calls
"NST", see :mod:`kdkit.losses.gram`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError


def _kernel_mean(a: torch.Tensor, b: torch.Tensor, degree: int, coef: float) -> torch.Tensor:
    """Mean over the batch and all channel pairs of (a_i . b_j + coef)^degree, a: [B, Ca, N], b: [B, Cb, N]."""
    return (torch.bmm(a, b.transpose(1, 2)) + coef).pow(degree).mean()


def nst_mmd(f_s: torch.Tensor, f_t: torch.Tensor, degree: int = 2, coef: float = 0.0) -> torch.Tensor:
    """Squared MMD between the student's and the teacher's L2-normalised channel maps (polynomial kernel)."""
    if f_s.dim() != 4 or f_t.dim() != 4:
        raise ModelError(f"NST needs [B, C, H, W] feature maps, got {tuple(f_s.shape)} and {tuple(f_t.shape)}")
    if f_s.shape[2:] != f_t.shape[2:]:
        raise ModelError(f"NST compares channel maps of equal size: student {tuple(f_s.shape)} vs teacher "
                         f"{tuple(f_t.shape)}; pair layers of equal resolution or set method.resize=true")
    s = F.normalize(f_s.float().flatten(2), dim=2)
    t = F.normalize(f_t.detach().float().flatten(2), dim=2)
    return (_kernel_mean(t, t, degree, coef) + _kernel_mean(s, s, degree, coef)
            - 2 * _kernel_mean(s, t, degree, coef))


class NSTLoss(nn.Module):
    """:func:`nst_mmd` as a module; ``resize`` first resizes the student's maps to the teacher's size."""

    def __init__(self, resize: bool = False, degree: int = 2, coef: float = 0.0):
        super().__init__()
        self.resize, self.degree, self.coef = resize, degree, coef

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        if self.resize and f_s.dim() == 4 and f_s.shape[2:] != f_t.shape[2:]:
            f_s = F.interpolate(f_s, size=f_t.shape[2:], mode="bilinear", align_corners=False)
        return nst_mmd(f_s, f_t, self.degree, self.coef)
