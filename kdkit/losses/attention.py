"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    A(F) = vec( sum_c |F_c|^p ) / || vec( sum_c |F_c|^p ) ||_2        (spatial attention map, p = 2)
    L_AT = (1 / (B * H * W)) * sum_b || A(F_s)_b - A(F_t)_b ||^2

The maps of student and teacher must share their spatial size (channels may differ); set ``resize``
to bilinearly resize the student map first. Note the normalisation makes the sum and the mean over
channels equivalent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError


def attention_map(f: torch.Tensor, p: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """``[B, C, H, W] -> [B, H*W]``: L2-normalised channel sum of |F|^p."""
    if f.dim() != 4:
        raise ModelError(f"attention transfer needs [B, C, H, W] feature maps, got shape {tuple(f.shape)}")
    f = f.float()
    a = (f * f if p == 2 else f.abs().pow(p)).sum(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1, eps=eps)


class AttentionLoss(nn.Module):
    def __init__(self, p: float = 2.0, resize: bool = False):
        super().__init__()
        self.p = p
        self.resize = resize

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        if f_s.shape[2:] != f_t.shape[2:]:
            if not self.resize:
                raise ModelError(
                    f"attention maps differ in size: student {tuple(f_s.shape)} vs teacher {tuple(f_t.shape)}; "
                    "pair layers of equal resolution or set method.resize=true"
                )
            f_s = F.interpolate(f_s, size=f_t.shape[2:], mode="bilinear", align_corners=False)
        return (attention_map(f_s, self.p) - attention_map(f_t.detach(), self.p)).pow(2).mean()
