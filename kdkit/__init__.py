"""kdkit: knowledge distillation for any PyTorch model, with whatever data you have.

    res = kdkit.distill(teacher, student, train_loader, method="kd", test_data=test_loader)
    res = kdkit.train(model, "digits", train={"epochs": 5})
    kdkit.load("runs/x/model.pt")                 # a trained model, ready for inference
    kdkit.evaluate("runs/x", split="train")       # its metrics on a split of the data it was trained on
    kdkit.export(res, "onnx")                     # the student alone, checked, with its preprocessing (JSON)
    kdkit.models.create("resnet20", num_classes=100)
    kdkit.compare("benchmarks/compare/mnist_lowlabel_kd.yaml")   # arms over paired seeds, with 95% intervals
"""

__version__ = "0.1.0"

from . import models
from .api import Result, distill, evaluate, train
from .compare import compare
from .errors import KdkitError
from .exporting import export
from .modelfile import load

__all__ = ["KdkitError", "Result", "__version__", "compare", "distill", "evaluate", "export", "load", "models", "train"]
