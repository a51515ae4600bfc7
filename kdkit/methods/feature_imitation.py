"""Fine-grained feature imitation for detection (Wang, Yuan, Zhang & Feng, CVPR 2019; the loss and the
anchor-free form of its mask in :mod:`kdkit.losses.imitation`):

    L = ce_weight * L_det + imitation_weight * sum_pairs L_imit(adap(F_s), F_t; I) + kd_weight * L_heatmapKD

The adapter is the authors': a 3x3 convolution to the teacher's width followed by ReLU, on every pair. Defaults
follow their training script: weight 0.01, psi 0.5, and no imitation during the first 400 optimisation steps
(``warmup_steps``, their warm-up). Default pair: the last stage of both detectors (the neck, before the
heads). The mask is read from the labels' boxes, so the method needs labeled data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import Batch
from ..errors import ModelError
from ..losses.imitation import imitation_mask, masked_imitation
from ..schema import opt
from . import register
from .pairs import PairDistiller, PairOptions, same_grid


@dataclass
class FeatureImitationOptions(PairOptions):
    kd_weight: float = opt(0.0, "weight of soft targets on the class heatmaps beside it", ge=0)
    ce_weight: float = opt(1.0, "weight of the detection loss on labels", ge=0)
    imitation_weight: float = opt(0.01, "weight of the imitation term (the authors' 0.01)", ge=0)
    psi: float = opt(0.5, "a location is imitated when its ground-truth-sized box overlaps the ground truth by more "
                          "than psi times the best overlap", gt=0, lt=1)
    warmup_steps: int = opt(400, "optimisation steps without imitation at the start (the authors' 400)", ge=0)


@register
class FeatureImitation(PairDistiller):
    name = "feature_imitation"
    Options = FeatureImitationOptions
    tasks = ("detection",)
    default_pairs = "last"
    term = "imitation"

    def __init__(self, opts: FeatureImitationOptions, **kw: Any):
        super().__init__(opts, **kw)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def make_loss(self, s_shape: torch.Size, t_shape: torch.Size, names: tuple[str, str]) -> nn.Module:
        same_grid(s_shape, t_shape, names, "feature imitation")
        return nn.Sequential(nn.Conv2d(s_shape[1], t_shape[1], 3, padding=1), nn.ReLU())

    def weight(self) -> float:
        return self.opts.imitation_weight

    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.student_taps is not None and self.teacher_taps is not None
        if batch.y is None:
            raise ModelError("feature_imitation reads the ground-truth boxes for its mask; this data has no labels")
        on = bool(self.steps_done >= self.opts.warmup_steps)
        if self.student.training and torch.is_grad_enabled():  # the engine puts the student (not the method)
            self.steps_done += 1                                # in training mode: count its steps
        total = s_logits.new_zeros(())
        for (s, t), adapter in zip(self.pairs, self.pair_losses):
            ft = self.teacher_taps[t]
            mask = imitation_mask(batch.y.float(), ft.shape[-2], ft.shape[-1], self.opts.psi)
            total = total + masked_imitation(adapter(self.student_taps[s]), ft, mask)
        return {self.term: self.weight() * total * (1.0 if on else 0.0)}
