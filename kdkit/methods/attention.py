"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    L = ce_weight * CE(z_s, y) + kd_weight * L_KD + at_weight * sum_pairs mean( (A(F_s) - A(F_t))^2 )
    A(F) = vec(sum_c |F_c|^p) / ||vec(sum_c |F_c|^p)||_2

No adapter is needed: channels may differ, spatial sizes must match (or set ``resize``). Default pairs:
every stage, matched by relative depth; defaults follow the CRD benchmark (at_weight 1000, p 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError
from ..losses import AttentionLoss
from ..losses.adapters import needs_resize
from ..schema import opt
from . import register
from .pairs import PairDistiller, PairOptions


@dataclass
class AttentionOptions(PairOptions):
    at_weight: float = opt(1000.0, "weight of the attention-transfer term", ge=0)
    p: float = opt(2.0, "exponent p of the attention map sum_c |F_c|^p", gt=0)


@register
class AttentionTransfer(PairDistiller):
    name = "attention"
    Options = AttentionOptions
    tasks = ("classification", "segmentation", "detection")
    default_pairs = "all"
    term = "at"

    def make_loss(self, s_shape: torch.Size, t_shape: torch.Size, names: tuple[str, str]) -> nn.Module:
        if len(s_shape) != 4 or len(t_shape) != 4:
            raise ModelError(
                f"attention transfer needs [B, C, H, W] maps: {names[0]!r} is {tuple(s_shape)}, "
                f"{names[1]!r} is {tuple(t_shape)}"
            )
        needs_resize(s_shape, t_shape, names, self.opts.resize)  # a clear error now, not at the first step
        return AttentionLoss(self.opts.p, self.opts.resize)

    def weight(self) -> float:
        return self.opts.at_weight
