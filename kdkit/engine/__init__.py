"""The training engine: one loop for every method (see :mod:`kdkit.engine.trainer`)."""

from .checkpoint import atomic_save, load_latest, read
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate
from .trainer import Engine, Interrupted, apply_speed_options

__all__ = ["DistInfo", "Engine", "Interrupted", "apply_speed_options", "atomic_save", "evaluate", "init_distributed",
           "load_latest", "read"]
