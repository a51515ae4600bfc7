"""DIST (Huang et al., NeurIPS 2022; the loss in :mod:`kdkit.losses.dist`): the student's predictions are
matched to the teacher's by Pearson correlation, across classes per sample and across samples per class:

    L = ce_weight * CE(z_s, y) + dist_weight * tau^2 * (beta * L_inter + gamma * L_intra)

Defaults are the authors' ImageNet setting (beta = gamma = tau = 1, weights 1). Works on classifier logits and
on dense logit maps (segmentation, every pixel a row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Batch
from ..losses.dist import dist_loss
from ..schema import opt
from . import register
from .distiller import Distiller, DistillOptions


@dataclass
class DISTOptions(DistillOptions):
    temperature: float = opt(1.0, "softmax temperature tau of the DIST term (and of a KD term, if any)", gt=0)
    kd_weight: float = opt(0.0, "weight of a plain KD term besides DIST (the authors': none)", ge=0)
    ce_weight: float = opt(1.0, "weight of the cross-entropy on labels", ge=0)
    dist_weight: float = opt(1.0, "weight of the DIST term", ge=0)
    beta: float = opt(1.0, "weight of the inter-class relation (per sample, across classes)", ge=0)
    gamma: float = opt(1.0, "weight of the intra-class relation (per class, across samples)", ge=0)


@register
class DIST(Distiller):
    name = "dist"
    Options = DISTOptions
    tasks = ("classification", "segmentation")

    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.opts
        zs, zt = self.task.class_logits(s_logits), self.task.class_logits(t_logits)
        return {"dist": o.dist_weight * dist_loss(zs, zt, o.beta, o.gamma, o.temperature)}
