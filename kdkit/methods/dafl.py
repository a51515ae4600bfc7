"""DAFL: Data-Free Learning of Student Networks (Chen et al., ICCV 2019).

The generator G minimises ``L_G = w_oh L_oh + w_a L_a + w_ie L_ie`` on the teacher's logits o and features f
(the input of its classifier) for generated images x:

* one-hot ``L_oh = CE(o, argmax o)`` (the teacher should be confident);
* activation ``L_a = -mean |f|`` (the teacher's features should fire strongly), f the input of the teacher's
  first fully-connected layer, as in the authors' code: LeNet-5's 120-d conv3 output, ResNet's pooled
  features;
* information entropy ``L_ie = sum_k pbar_k log10 pbar_k`` (every class equally often; log10 as in the
  authors' code).

The student is trained jointly, one step per generator step, on the generator's batch (detached) with
KL at ``temperature`` (the authors' T = 1). Defaults are the authors' MNIST settings: w_oh 1, w_a 0.1,
w_ie 5, Adam at 0.2 for G, batch 512.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..losses.datafree import activation_loss, information_entropy_loss, one_hot_loss
from ..models.parts import model_parts
from ..schema import opt
from . import register
from .base import Stage
from .datafree import DataFree, GeneratorOptions


@dataclass
class DAFLOptions(GeneratorOptions):
    generator_lr: float = opt(0.2, "Adam learning rate of the generator (the authors' 0.2 for MNIST)", gt=0)
    one_hot_weight: float = opt(1.0, "weight w_oh of the one-hot loss", ge=0)
    activation_weight: float = opt(0.1, "weight w_a of the activation loss", ge=0)
    entropy_weight: float = opt(5.0, "weight w_ie of the information-entropy loss", ge=0)
    entropy_log_base: float = opt(10.0, "logarithm base of the information entropy (the authors' code: 10)", gt=1)
    feature_layer: str | None = opt(None, "the teacher's feature tap for L_a (default: the input of its first "
                                          "nn.Linear, the authors' choice)")


def first_linear_input(model: nn.Module) -> str:
    """Tap path of the input of `model`'s first ``nn.Linear`` (its flattened features before any
    fully-connected layer); the classifier's input when none is found first."""
    first = next((name for name, m in model.named_modules() if isinstance(m, nn.Linear)), None)
    return f"{first or model_parts(model).classifier}:input"


@register
class DAFL(DataFree):
    name = "dafl"
    Options = DAFLOptions
    student_data = "generator_batch"

    def __init__(self, opts: Any, **kw: Any):
        super().__init__(opts, **kw)
        self.feature_path = opts.feature_layer or first_linear_input(self.teacher)
        self.tap([], [self.feature_path])

    def generator_step(self, batch: Any) -> dict[str, torch.Tensor]:
        assert self.generator is not None and self.teacher_taps is not None
        o_ = self.opts
        x = self.generator(self.generator.noise(self.batch_size))
        o = self.teacher(x)
        f = self.teacher_taps[self.feature_path]
        terms = {"one_hot": one_hot_loss(o), "activation": activation_loss(f),
                 "entropy": information_entropy_loss(o, o_.entropy_log_base)}
        loss = (o_.one_hot_weight * terms["one_hot"] + o_.activation_weight * terms["activation"]
                + o_.entropy_weight * terms["entropy"])
        self.teacher_taps.clear()
        self.remember(x, o)
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}

    def stages(self) -> list[Stage]:
        assert self.generator is not None
        return [self.generated_stage("joint", [self.generator_update(self.generator_step),
                                               self.student_update(self.opts.student_steps)],
                                     self.train_cfg.epochs, [self.generator, self.student])]
