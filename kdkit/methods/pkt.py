"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018; the loss in :mod:`kdkit.losses.similarity`):

    L = ce_weight * CE(z_s, y) + pkt_weight * sum over layer pairs of KL(P_t || P_s)

P the conditional probabilities of the cosine kernel between the batch's (pooled) features: the student keeps
the teacher's neighbourhoods. Widths may differ (no adapter). Defaults follow the authors' benchmark code
(mdistiller): the pooled output of the last stage, weight 30000.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..losses.similarity import PKTLoss
from ..schema import opt
from . import register
from .pairs import PairDistiller, PairOptions


@dataclass
class PKTOptions(PairOptions):
    pkt_weight: float = opt(30000.0, "weight of the PKT term (mdistiller's CIFAR-100 value)", ge=0)


@register
class PKT(PairDistiller):
    name = "pkt"
    Options = PKTOptions
    tasks = ("classification", "embedding")
    default_pairs = "last"
    term = "pkt"
    pair_loss = PKTLoss
