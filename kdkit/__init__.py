"""kdkit: knowledge distillation for any PyTorch model, with whatever data you have.

    res = kdkit.distill(teacher, student, train_loader, method="kd", test_data=test_loader)
    res = kdkit.train(model, "digits", train={"epochs": 5})
    kdkit.load("runs/x/model.pt")                 # a trained model, ready for inference
    kdkit.export(res, "onnx")                     # the student alone, checked, with its preprocessing (JSON)
    kdkit.models.create("resnet20", num_classes=100)
    kdkit.compare("benchmarks/compare/mnist_lowlabel_kd.yaml")   # arms over paired seeds, with 95% intervals
"""

__version__ = "0.1.0"

from . import models
from .api import Result, distill, train
from .compare import compare
from .errors import KdkitError
from .exporting import export
from .modelfile import load

__all__ = ["KdkitError", "Result", "__version__", "compare", "distill", "export", "load", "models", "train"]
