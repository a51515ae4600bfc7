"""Focal and global distillation for detectors (FGD: Yang et al., "Focal and Global Knowledge Distillation for
Detectors", CVPR 2022; the loss in :mod:`kdkit.losses.fgd`):

    L = ce_weight * L_det + fgd_weight * sum_pairs ( alpha L_fg + beta L_bg + gamma L_at + lambda L_global )
        + kd_weight * L_heatmapKD

L_fg and L_bg are the squared feature differences inside and outside the ground-truth boxes, weighted by the
teacher's spatial and channel attention and by the inverse box size; L_at matches the attentions; L_global the
maps after a GcBlock on each side. The alignment conv (1x1, where the widths differ) and both GcBlocks are
trained with the student, as in the authors' code. Defaults are their FeatureLoss defaults (T 0.5, alpha 0.001,
beta 0.0005, gamma 0.001, lambda 5e-6), applied to every pair; default pair: the last stage of both detectors
(the neck, before the heads). The masks read the labels' boxes, so the method needs labeled data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data import Batch
from ..errors import ModelError
from ..losses.fgd import FGDLoss
from ..schema import opt
from . import register
from .pairs import PairDistiller, PairOptions, same_grid


@dataclass
class FGDOptions(PairOptions):
    kd_weight: float = opt(0.0, "weight of soft targets on the class heatmaps beside it", ge=0)
    ce_weight: float = opt(1.0, "weight of the detection loss on labels", ge=0)
    fgd_weight: float = opt(1.0, "multiplier of the whole FGD term (its terms' own weights are below)", ge=0)
    fgd_temperature: float = opt(0.5, "temperature T of the spatial and channel attention (the authors' 0.5)", gt=0)
    alpha_fgd: float = opt(0.001, "weight of the foreground feature loss (the authors' 0.001)", ge=0)
    beta_fgd: float = opt(0.0005, "weight of the background feature loss (the authors' 0.0005)", ge=0)
    gamma_fgd: float = opt(0.001, "weight of the attention loss (the authors' 0.001)", ge=0)
    lambda_fgd: float = opt(5e-6, "weight of the global (GcBlock) loss (the authors' 5e-6)", ge=0)


@register
class FGD(PairDistiller):
    name = "fgd"
    Options = FGDOptions
    tasks = ("detection",)
    default_pairs = "last"
    term = "fgd"

    def make_loss(self, s_shape: torch.Size, t_shape: torch.Size, names: tuple[str, str]) -> nn.Module:
        same_grid(s_shape, t_shape, names, "FGD")
        o = self.opts
        return FGDLoss(s_shape[1], t_shape[1], o.fgd_temperature, o.alpha_fgd, o.beta_fgd, o.gamma_fgd, o.lambda_fgd)

    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.student_taps is not None and self.teacher_taps is not None
        if batch.y is None:
            raise ModelError("fgd reads the ground-truth boxes for its masks; this data has no labels")
        total = sum(loss(self.student_taps[s], self.teacher_taps[t], batch.y)
                    for (s, t), loss in zip(self.pairs, self.pair_losses))
        return {self.term: self.weight() * total}
