"""RDSKD: Robustness and Diversity Seeking Data-Free Knowledge Distillation (Han, Park, Wang & Liu, ICASSP 2021).

A DAFL generator G makes images x from noise; with the teacher's logits o and p = softmax(o) on a batch
split into two halves, G minimises

    L_G = exp(L_oh - Lref_oh) + exp(L_ie - Lref_ie) + L_ds

* authenticity ``L_oh = CE(o, argmax o)``; class diversity ``L_ie = sum_k pbar_k log pbar_k``;
* inter-sample diversity ``L_ds = 1 / (||x_2 - x_1|| / ||p_2 - p_1|| + eps)``;
* ``Lref`` are detached snapshots of L_oh and L_ie, zero at first and refreshed every ``ref_interval``
  generator steps (at step 1, 1 + interval, ...: the second iteration of each 120-step epoch in the authors'
  code). The exponential turns a rise of a term above its reference into a steeply growing penalty, which
  keeps the conflicting authenticity and diversity terms from trading each other away.

Schedules: ``two_stage`` (the authors'): G alone for ``generator_epochs``, then the student on fresh samples
of the frozen G (eval mode) with T^2 KL at ``temperature`` (10); ``joint``: alternating generator and
student steps, the student on the generator's batch, as DAFL does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..losses.datafree import diversity_seeking_loss, exp_penalty, information_entropy_loss, one_hot_loss
from ..schema import opt
from . import register
from .base import Stage
from .datafree import DataFree, GeneratorOptions


@dataclass
class RDSKDOptions(GeneratorOptions):
    temperature: float = opt(10.0, "temperature T of the student's KD loss (the authors' 10)", gt=0)
    schedule: Literal["two_stage", "joint"] = opt("two_stage", "generator then student (the authors'), or joint "
                                                  "alternating steps")
    generator_epochs: int = opt(20, "two_stage: epochs of generator training (the authors' 20 x 120 steps)", ge=0)
    ref_interval: int = opt(120, "refresh the reference values Lref every N generator steps", gt=0)
    ds_eps: float = opt(1e-20, "eps of the diversity-seeking term's denominator", gt=0)


@register
class RDSKD(DataFree):
    name = "rdskd"
    Options = RDSKDOptions

    def __init__(self, opts: Any, **kw: Any):
        super().__init__(opts, **kw)
        self.student_data = "generator_batch" if opts.schedule == "joint" else "fresh"
        self.register_buffer("ref_oh", torch.zeros(()))
        self.register_buffer("ref_ie", torch.zeros(()))
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))

    def generator_step(self, batch: Any) -> dict[str, torch.Tensor]:
        assert self.generator is not None
        x = self.generator(self.generator.noise(self.batch_size))
        o = self.teacher(x)
        l_oh, l_ie = one_hot_loss(o), information_entropy_loss(o)
        l_ds = diversity_seeking_loss(x, o, self.opts.ds_eps)
        loss = exp_penalty(l_oh, self.ref_oh) + exp_penalty(l_ie, self.ref_ie) + l_ds
        if int(self.generator_steps) % self.opts.ref_interval == 1 % self.opts.ref_interval:
            self.ref_oh.copy_(l_oh.detach())
            self.ref_ie.copy_(l_ie.detach())
        self.generator_steps += 1
        if self.opts.schedule == "joint":
            self.remember(x, o)
        return {"loss": loss, "one_hot": l_oh.detach(), "entropy": l_ie.detach(), "diversity": l_ds.detach()}

    def stages(self) -> list[Stage]:
        assert self.generator is not None
        g, s = self.generator, self.student
        if self.opts.schedule == "joint":
            return [self.generated_stage("joint", [self.generator_update(self.generator_step),
                                                   self.student_update(self.opts.student_steps)],
                                         self.train_cfg.epochs, [g, s])]
        return [self.generated_stage("generator", [self.generator_update(self.generator_step)],
                                     self.opts.generator_epochs, [g], select="last"),
                self.generated_stage("student", [self.student_update()], self.train_cfg.epochs, [s])]
