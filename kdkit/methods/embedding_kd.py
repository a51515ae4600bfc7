"""Direct embedding distillation: the student's embedding, projected to the teacher's width when they differ,
is pulled onto the teacher's (the baseline the head-sharing paper compares against; the distances in
kdkit.losses.embedding):

    L = ce_weight * CE(head(e_s), y) + emb_weight * D(P(e_s), e_t),   D: l2 or cosine between unit embeddings

with the student's own head over the training identities (``embedding.head``) and P a learned linear
projector (only when the widths differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..data import Batch
from ..losses import embedding_distance
from ..schema import opt
from . import register
from .distiller import Distiller, DistillOptions


@dataclass
class EmbeddingKDOptions(DistillOptions):
    kd_weight: float = opt(0.0, "weight of soft targets (classification only)", ge=0)
    ce_weight: float = opt(1.0, "weight of the supervised loss through the student's head", ge=0)
    emb_weight: float = opt(1.0, "weight of the embedding distance", ge=0)
    emb_metric: Literal["l2", "cosine"] = opt("l2", "distance between unit embeddings: l2 (squared) or cosine")


@register
class EmbeddingKD(Distiller):
    name = "embedding_kd"
    Options = EmbeddingKDOptions
    tasks = ("embedding",)

    def __init__(self, opts: EmbeddingKDOptions, **kw: Any):
        super().__init__(opts, **kw)
        self.projector: nn.Module = nn.Identity()

    @torch.no_grad()
    def setup(self, sample: Batch) -> None:
        was = self.student.training
        self.student.eval()
        ds = self.student(sample.x[:2]).shape[1]
        self.student.train(was)
        dt = self.teacher(sample.x[:2]).shape[1]
        if ds != dt:
            self.projector = nn.Linear(ds, dt).to(sample.x.device)

    def extra_losses(self, batch: Batch, s_out: torch.Tensor, t_out: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.opts
        return {"emb": o.emb_weight * embedding_distance(self.projector(s_out), t_out, o.emb_metric)}

    def extra_modules(self) -> list[nn.Module]:
        return [self.projector]
