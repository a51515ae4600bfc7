"""Supervised training of one model with cross-entropy (teachers, and students alone).

    L = CE(z, y)  (optionally with label smoothing)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Batch
from ..schema import opt
from . import register
from .base import Method, Stage, Update, params_of


@dataclass
class SupervisedOptions:
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy", ge=0, lt=1)


@register
class Supervised(Method):
    name = "supervised"
    Options = SupervisedOptions
    needs_teacher = False
    frozen_prefixes = ()
    tasks = ("classification", "segmentation", "detection", "embedding")

    def step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None and batch.y is not None
        out = self.task.align(self.student(batch.x), batch.x)
        return {self.task.loss_name: self.task.loss(out, batch.y, self.opts.label_smoothing, head=self.head)}

    def stages(self) -> list[Stage]:
        trained = [m for m in (self.student, self.head) if m is not None]
        return [Stage("train", [Update("model", params_of(*trained), self.step)], self.train_cfg.epochs,
                      train_modules=trained)]
