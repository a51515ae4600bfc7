"""Classification: one class index per sample; top-1 accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DataError, ModelError
from .base import Meter, Task


class AccuracyMeter(Meter):
    """correct, summed cross-entropy, count."""

    def __init__(self, device: torch.device | str):
        super().__init__(3, device)

    def update(self, output: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> None:
        output = output.float()
        self.stats[0] += (output.argmax(1) == target).sum()
        self.stats[1] += F.cross_entropy(output, target, reduction="sum")
        self.stats[2] += len(target)

    def result(self) -> dict[str, Any]:
        n = max(1.0, self.stats[2].item())
        return {"accuracy": self.stats[0].item() / n, "loss": self.stats[1].item() / n,
                "count": int(self.stats[2].item())}


class Classification(Task):
    name = "classification"
    primary = "accuracy"
    agreement_key = "top1_agreement"
    target_kind = "a class index"

    def check_output(self, out: Any, x: torch.Tensor, num_classes: int, who: str, data_name: str) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(
                f"{who} outputs {shape} for a batch of {len(x)}, expected ({len(x)}, {num_classes}) logits for "
                f"{data_name}'s {num_classes} classes; set num_classes or adapt the model's forward")

    def loss(self, out: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
             head: torch.nn.Module | None = None) -> torch.Tensor:
        return F.cross_entropy(out, target, label_smoothing=label_smoothing)

    def meter(self, channels: int, device: torch.device | str) -> Meter:
        return AccuracyMeter(device)

    def check_targets(self, target: torch.Tensor, num_classes: int, where: str) -> None:
        if target.dim() != 1:
            raise DataError(f"{where}: classification labels are one class index per sample [N], got "
                            f"{tuple(target.shape)}; for per-pixel labels set task: segmentation")
