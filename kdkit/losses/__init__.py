"""Loss modules, each a small ``nn.Module`` usable on any pair of layers (see :mod:`kdkit.taps`)."""

from .adapters import Adapter
from .attention import AttentionLoss, attention_map
from .hint import HintLoss
from .kd import KDLoss, kd_loss

__all__ = ["Adapter", "AttentionLoss", "HintLoss", "KDLoss", "attention_map", "kd_loss"]
