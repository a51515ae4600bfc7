"""Relational knowledge distillation on embeddings (Park et al., CVPR 2019; the losses in kdkit.losses.rkd):

    L = ce_weight * CE(head(e_s), y) + distance_weight * L_D(e_s, e_t) + angle_weight * L_A(e_s, e_t)

with the student's own head over the training identities (``embedding.head``). Defaults are the authors'
metric-learning weights, 25 and 50. Works on any model output ``[B, D]`` (embeddings; also classifier logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Batch
from ..losses.rkd import rkd_angle, rkd_distance
from ..schema import opt
from . import register
from .distiller import Distiller, DistillOptions


@dataclass
class RKDOptions(DistillOptions):
    kd_weight: float = opt(0.0, "weight of soft targets (classification only)", ge=0)
    ce_weight: float = opt(1.0, "weight of the supervised loss through the student's head", ge=0)
    distance_weight: float = opt(25.0, "weight of the distance term (the authors' 25)", ge=0)
    angle_weight: float = opt(50.0, "weight of the angle term (the authors' 50)", ge=0)


@register
class RKD(Distiller):
    name = "rkd"
    Options = RKDOptions
    tasks = ("classification", "embedding")

    def extra_losses(self, batch: Batch, s_out: torch.Tensor, t_out: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.opts
        out = {}
        if o.distance_weight > 0:
            out["rkd_distance"] = o.distance_weight * rkd_distance(s_out, t_out)
        if o.angle_weight > 0:
            out["rkd_angle"] = o.angle_weight * rkd_angle(s_out, t_out)
        return out
