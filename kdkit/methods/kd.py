"""Vanilla knowledge distillation (Hinton, Vinyals & Dean, 2015).

    L = ce_weight * CE(z_s, y) + a(e) * kd_weight * T^2 * KL( softmax(z_t/T) || softmax(z_s/T) )

Defaults T=4, kd_weight=0.9, ce_weight=0.1 (the common CIFAR benchmark setting); a(e) = 1 unless
``kd_anneal=cosine``, kdkit's option (not Hinton's): a(e) = (1 + cos(pi e / E)) / 2 for the epoch e = 0..E-1,
so the soft targets lead early and the student ends on the labels, as the learning rate's cosine schedule does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..data import Batch
from ..schema import opt
from . import register
from .distiller import Distiller, DistillOptions, EpochFactor


@dataclass
class KDOptions(DistillOptions):
    kd_anneal: Literal["none", "cosine"] = opt(
        "none", "soft-target weight over the epochs: none (constant kd_weight) or cosine (kd_weight * (1 + cos(pi "
                "e / epochs)) / 2 at epoch e = 0, 1, ...: full weight first, nearly 0 in the last epoch)")


@register
class KD(EpochFactor, Distiller):
    name = "kd"
    Options = KDOptions
    tasks = ("classification", "segmentation", "detection")

    def factor_active(self, opts: Any) -> bool:
        return opts.kd_anneal != "none"

    def epoch_factor(self) -> float:
        """a(e) of the module docstring for the epoch being trained."""
        return 0.5 * (1.0 + math.cos(math.pi * int(self.epochs_done) / max(self.train_cfg.epochs, 1)))

    def factor_log(self) -> str:
        return "kd_anneal"

    def student_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        losses = super().student_step(batch)
        if "kd" in losses and self.factor_active(self.opts):
            losses["kd"] = self.epoch_factor() * losses["kd"]
        return losses
