"""kdkit: knowledge distillation for any PyTorch model, with whatever data you have.

    kdkit.load("runs/x/model.pt")                 # a trained model, ready for inference
    kdkit.models.create("resnet20", num_classes=100)
"""

__version__ = "0.1.0"

from . import models
from .errors import KdkitError
from .modelfile import load

__all__ = ["KdkitError", "__version__", "load", "models"]
