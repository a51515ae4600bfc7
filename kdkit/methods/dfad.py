"""DFAD: Data-Free Adversarial Distillation (Fang, Song, Wang, Shen, Wang & Song, 2019, arXiv 1912.11006).

Teacher and student together act as the discriminator of a generator G. On generated images x the model
discrepancy is the mean absolute difference of their logits, ``L_adv = mean |o_t(x) - o_s(x)|``:

* the student minimises L_adv on fresh samples of G, ``student_steps`` (k = 5) times per generator step;
* G maximises it (minimises -L_adv): it seeks the "hard samples" on which the student still disagrees.

Defaults follow the authors' MNIST script (``DFAD_mnist.py``): a DAFL-style generator with 100-d noise (their
CIFAR scripts use 256), Adam at 1e-3 for G, five student steps per generator step, 50 steps per epoch; the
student there uses SGD at 0.01 with momentum 0.9 and weight decay 1e-4, batch 512, 40 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..losses.datafree import l1_logit_distance
from ..schema import opt
from . import register
from .base import Stage
from .datafree import DataFree, GeneratorOptions


@dataclass
class DFADOptions(GeneratorOptions):
    student_steps: int = opt(5, "student steps per generator step (the authors' 5)", ge=1)
    steps_per_epoch: int = opt(50, "generator steps per epoch (the authors' 50)", gt=0)
    generator_bn_eps: float = opt(1e-5, "eps of the generator's middle BatchNorms (DFAD's own generator: PyTorch's "
                                  "1e-5; DAFL's code passes 0.8)", gt=0)


@register
class DFAD(DataFree):
    name = "dfad"
    Options = DFADOptions
    student_data = "fresh"

    def distill_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"l1": l1_logit_distance(s_logits, t_logits)}

    def generator_step(self, batch: Any) -> dict[str, torch.Tensor]:
        assert self.generator is not None
        x = self.generator(self.generator.noise(self.batch_size))
        gap = l1_logit_distance(self.student(x), self.teacher(x))
        return {"loss": -gap, "l1": gap.detach()}

    def stages(self) -> list[Stage]:
        assert self.generator is not None
        return [self.generated_stage("adversarial", [self.student_update(self.opts.student_steps),
                                                     self.generator_update(self.generator_step)],
                                     self.train_cfg.epochs, [self.generator, self.student])]
