"""FitNets hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), single-stage form.

    L = ce_weight * CE(z_s, y) + kd_weight * L_KD + hint_weight * sum_pairs || r(F_s) - F_t ||^2 / numel

r is a learned adapter (1x1 conv + BN for maps, linear for vectors) created from the observed shapes
when widths differ. Default pair: the middle stage of each model; defaults follow the CRD benchmark
(hint_weight 100, kd_weight 0, ce_weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..losses import Adapter, HintLoss
from ..losses.adapters import AdapterKind
from ..schema import opt
from . import register
from .pairs import PairDistiller, PairOptions


@dataclass
class FitNetsOptions(PairOptions):
    hint_weight: float = opt(100.0, "weight of the hint (MSE) term", ge=0)
    adapter: AdapterKind = opt("auto", "auto (identity if widths match, else 1x1 conv + BN / linear), conv, conv_bn")


@register
class FitNets(PairDistiller):
    name = "fitnets"
    Options = FitNetsOptions
    tasks = ("classification", "segmentation", "detection")
    default_pairs = "middle"
    term = "hint"

    def make_loss(self, s_shape: torch.Size, t_shape: torch.Size, names: tuple[str, str]) -> nn.Module:
        return HintLoss(Adapter(s_shape, t_shape, self.opts.adapter, "resize" if self.opts.resize else "same", names))

    def weight(self) -> float:
        return self.opts.hint_weight
