"""Gram-matrix regression of channel maps: the path the Adaptive Distillation code (Chennupati et al.,
BMVC 2021) calls "NST". It is not the NST paper's loss (Huang & Wang 2017, an MMD between the channel
distributions: :mod:`kdkit.losses.nst`), but a mean squared error between Gram matrices:

    f_c = vec(F_c) / ||vec(F_c)||_2                  (each channel's spatial map, L2-normalised)
    G   = [f_c . f_c']_{c,c'}                         (C x C Gram matrix per image)
    L_gram = mean( (G_s - G_t)^2 )                    over the batch and both Gram indices

Student and teacher must have the same number of channels (use an adapter); their spatial sizes may
differ, since each Gram matrix is taken over its own map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError


def gram(f: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[B, C, H, W] -> [B, C, C]``: Gram matrix of L2-normalised channel maps.

    Computed as <f_c, f_c'> / (max(||f_c||, eps) max(||f_c'||, eps)) from the Gram of the raw maps, which
    equals the Gram of the normalised maps without normalising the large ``[B, C, H*W]`` tensor.
    """
    if f.dim() != 4:
        raise ModelError(f"the Gram path needs [B, C, H, W] feature maps, got shape {tuple(f.shape)}")
    v = f.float().flatten(2)
    raw = torch.bmm(v, v.transpose(1, 2))
    norm = torch.diagonal(raw, dim1=1, dim2=2).clamp_min(eps * eps).sqrt()
    return raw / (norm.unsqueeze(2) * norm.unsqueeze(1))


class GramLoss(nn.Module):
    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        if f_s.shape[1] != f_t.shape[1]:
            raise ModelError(f"the Gram path needs equal channel counts (use an adapter): {f_s.shape[1]} vs "
                             f"{f_t.shape[1]}")
        return F.mse_loss(gram(f_s), gram(f_t.detach()))
