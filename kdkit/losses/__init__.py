"""Loss modules, each a small ``nn.Module`` usable on any pair of layers (see :mod:`kdkit.taps`)."""

from .adapters import Adapter
from .attention import AttentionLoss, attention_map
from .cwd import CWDLoss, cwd_loss
from .embedding import embedding_distance
from .gram import GramLoss, gram
from .hint import HintLoss
from .kd import KDLoss, kd_loss
from .nst import NSTLoss, nst_mmd
from .pairwise import PairwiseLoss, pairwise_loss
from .regression import FeatureMapLoss, SoftmaxRegressionLoss, logit_regression, pooled

__all__ = [
    "Adapter", "AttentionLoss", "CWDLoss", "FeatureMapLoss", "GramLoss", "HintLoss", "KDLoss", "NSTLoss",
    "PairwiseLoss", "SoftmaxRegressionLoss", "attention_map", "cwd_loss", "embedding_distance", "gram", "kd_loss",
    "logit_regression", "nst_mmd", "pairwise_loss", "pooled",
]
