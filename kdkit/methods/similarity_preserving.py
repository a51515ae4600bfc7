"""Similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019; the loss in
:mod:`kdkit.losses.similarity`):

    L = ce_weight * CE(z_s, y) + sp_weight * sum over layer pairs of ||G_t - G_s||_F^2 / B^2

G the row-normalised ``[B, B]`` Gram matrix of a layer's flattened outputs: the student keeps the teacher's
pattern of which images look alike. Widths and sizes may differ (no adapter). Defaults follow the authors'
benchmark code (mdistiller): the last stage, weight 3000.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..losses.similarity import SPLoss
from ..schema import opt
from . import register
from .pairs import PairDistiller, PairOptions


@dataclass
class SPOptions(PairOptions):
    sp_weight: float = opt(3000.0, "weight of the similarity-preserving term (mdistiller's CIFAR-100 value)", ge=0)


@register
class SimilarityPreserving(PairDistiller):
    name = "sp"
    Options = SPOptions
    tasks = ("classification", "embedding")
    default_pairs = "last"
    term = "sp"
    pair_loss = SPLoss
