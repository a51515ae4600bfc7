"""Contrastive representation distillation (Tian et al., ICLR 2020; the loss and memories in
:mod:`kdkit.losses.crd`):

    L = ce_weight * CE(z_s, y) + kd_weight * L_KD + crd_weight * (NCE(student vs teacher memory)
                                                                  + NCE(teacher vs student memory))

on the two models' penultimate features (the input of each classifier, or ``student_layer`` /
``teacher_layer``; feature maps are averaged over their positions). Defaults are the authors' CIFAR-100
settings (RepDistiller and mdistiller): weight 0.8, embedding width 128, 16,384 negatives, NCE temperature
0.07, memory momentum 0.5, negatives from other classes. ``memory: queue`` keeps the last K embeddings
instead of a bank row per training sample, for data too large for a bank. The bank needs each batch's
dataset indices; under torchrun each process keeps its own memory of the samples it sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import Batch
from ..errors import ConfigError, ModelError
from ..losses.crd import CRDLoss, Memory, Negatives
from ..losses.regression import pooled
from ..models import model_parts
from ..schema import opt
from . import register
from .distiller import Distiller, DistillOptions


@dataclass
class CRDOptions(DistillOptions):
    kd_weight: float = opt(0.0, "weight of a KD term besides CRD (the authors' CRD: 0; their CRD+KD: 1)", ge=0)
    ce_weight: float = opt(1.0, "weight of the cross-entropy on labels", ge=0)
    crd_weight: float = opt(0.8, "weight of the contrastive term (the authors' 0.8)", ge=0)
    feat_dim: int = opt(128, "width of the common embedding", ge=1)
    negatives: int = opt(16384, "negatives per anchor (K)", ge=1)
    nce_temperature: float = opt(0.07, "temperature of the contrastive scores", gt=0)
    momentum: float = opt(0.5, "bank: momentum of the memory rows", ge=0, lt=1)
    memory: Memory = opt("bank", "bank (a row per training sample, the paper) or queue (the last K embeddings)")
    negatives_from: Negatives = opt("other_classes", "bank: draw negatives from samples of other classes (the "
                                                     "authors' 'exact' mode; reads the labels) or from all samples")
    student_layer: str | None = opt(None, "the student's feature layer (default: its classifier's input)")
    teacher_layer: str | None = opt(None, "the teacher's feature layer (default: its classifier's input)")


@register
class CRD(Distiller):
    name = "crd"
    Options = CRDOptions
    tasks = ("classification",)

    def __init__(self, opts: CRDOptions, **kw: Any):
        super().__init__(opts, **kw)
        self.s_layer = opts.student_layer or f"{model_parts(self.student).classifier}:input"
        self.t_layer = opts.teacher_layer or f"{model_parts(self.teacher).classifier}:input"
        self.tap([self.s_layer], [self.t_layer])
        self.crd: CRDLoss | None = None

    def setup(self, sample: Batch) -> None:
        s_seen, t_seen = self.probe(sample)
        fs, ft = s_seen[self.s_layer], t_seen[self.t_layer]
        if not (isinstance(fs, torch.Tensor) and isinstance(ft, torch.Tensor)):
            raise ModelError(f"CRD: layers {self.s_layer!r} / {self.t_layer!r} do not output a single tensor; set "
                             "method.student_layer / method.teacher_layer")
        train = getattr(self.data, "train", None)
        if train is None:
            raise ConfigError("CRD needs the training set's size for its memory (method.name=crd runs on a "
                              "labeled training set)")
        o = self.opts
        labels = getattr(train, "labels", None) if o.negatives_from == "other_classes" else None
        if o.memory == "bank" and o.negatives_from == "other_classes" and labels is None:
            raise ConfigError("CRD: method.negatives_from=other_classes reads the labels, and this data has none; "
                              "set method.negatives_from=all")
        if labels is not None and labels.dim() != 1:
            raise ConfigError("CRD: negatives from other classes need one class per sample; set "
                              "method.negatives_from=all")
        self.crd = CRDLoss(pooled(fs).shape[1], pooled(ft).shape[1], len(train), dim=o.feat_dim, k=o.negatives,
                           temperature=o.nce_temperature, momentum=o.momentum, memory=o.memory, labels=labels,
                           negatives=o.negatives_from).to(sample.x.device)

    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.crd is not None and self.student_taps is not None and self.teacher_taps is not None
        fs, ft = pooled(self.student_taps[self.s_layer]), pooled(self.teacher_taps[self.t_layer])
        return {"crd": self.opts.crd_weight * self.crd(fs, ft, batch.index.to(fs.device))}

    def extra_modules(self) -> list[nn.Module]:
        return [self.crd] if self.crd is not None else []
