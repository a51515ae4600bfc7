"""Decoupled knowledge distillation (Zhao et al., CVPR 2022; the loss in :mod:`kdkit.losses.dkd`):

    L = ce_weight * CE(z_s, y) + min(epoch / warmup, 1) * T^2 * (alpha * TCKD + beta * NCKD)

epoch counted from 1, as in the authors' code (mdistiller), whose CIFAR-100 settings are the defaults: alpha 1,
beta 8, T 4, warm-up 20 epochs, CE weight 1. TCKD needs each sample's target class: DKD reads the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Batch
from ..losses.dkd import dkd_loss
from ..schema import opt
from . import register
from .distiller import Distiller, DistillOptions, EpochWarmup


@dataclass
class DKDOptions(DistillOptions):
    temperature: float = opt(4.0, "softmax temperature T", gt=0)
    kd_weight: float = opt(0.0, "weight of a plain KD term besides DKD (the authors': none)", ge=0)
    ce_weight: float = opt(1.0, "weight of the cross-entropy on labels", ge=0)
    alpha: float = opt(1.0, "weight of the target-class term TCKD", ge=0)
    beta: float = opt(8.0, "weight of the non-target-class term NCKD (the authors' CIFAR-100 value)", ge=0)
    warmup_epochs: int = opt(20, "the DKD term grows linearly to full weight over this many epochs (0: none)", ge=0)


@register
class DKD(EpochWarmup, Distiller):
    name = "dkd"
    Options = DKDOptions
    tasks = ("classification", "segmentation")

    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.opts
        if batch.y is None:
            self.supervised(s_logits, batch, "DKD's target-class term")  # the one clear error for unlabeled data
        loss = dkd_loss(self.task.class_logits(s_logits), self.task.class_logits(t_logits), batch.y, o.alpha, o.beta,
                        o.temperature, o.logit_standardization)
        return {"dkd": self.epoch_factor() * loss}
