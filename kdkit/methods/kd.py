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
from .base import Stage
from .distiller import Distiller, DistillOptions


@dataclass
class KDOptions(DistillOptions):
    kd_anneal: Literal["none", "cosine"] = opt(
        "none", "soft-target weight over the epochs: none (constant kd_weight) or cosine (kd_weight * (1 + cos(pi "
                "e / epochs)) / 2 at epoch e = 0, 1, ...: full weight first, nearly 0 in the last epoch)")


@register
class KD(Distiller):
    name = "kd"
    Options = KDOptions
    tasks = ("classification", "segmentation", "detection")

    def __init__(self, opts: Any, **kw: Any):
        super().__init__(opts, **kw)
        if opts.kd_anneal != "none":  # the epochs finished: a buffer, so a resumed run anneals from where it stopped
            self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))

    def anneal_factor(self) -> float:
        """a(e) of the module docstring for the epoch being trained."""
        if self.opts.kd_anneal == "none":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * int(self.epochs_done) / max(self.train_cfg.epochs, 1)))

    def student_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        losses = super().student_step(batch)
        if "kd" in losses and self.opts.kd_anneal != "none":
            losses["kd"] = self.anneal_factor() * losses["kd"]
        return losses

    def _end_epoch(self, epoch: int) -> dict[str, float]:
        factor = self.anneal_factor()
        self.epochs_done += 1
        return {"kd_anneal": factor}

    def stages(self) -> list[Stage]:
        (stage,) = super().stages()
        if self.opts.kd_anneal != "none":
            stage.on_epoch_end = self._end_epoch
        return [stage]
