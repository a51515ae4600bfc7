"""Accuracy of a model on a split (sharded across processes under torchrun)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import BatchLoader
from .distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, dist: DistInfo | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of `model` over `loader` (labels required)."""
    was = model.training
    model.eval()
    device = loader.device
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for batch in loader:
        assert batch.y is not None
        logits = model(batch.x).float()
        stats[0] += (logits.argmax(1) == batch.y).sum()
        stats[1] += F.cross_entropy(logits, batch.y, reduction="sum")
        stats[2] += len(batch.y)
    model.train(was)
    if dist is not None:
        all_reduce_sum(stats, dist)
    n = max(1.0, stats[2].item())
    return {"accuracy": stats[0].item() / n, "loss": stats[1].item() / n, "count": int(stats[2].item())}


@torch.no_grad()
def predictions(model: nn.Module, loader: BatchLoader) -> torch.Tensor:
    """Argmax predictions over `loader` in order (single process)."""
    was = model.training
    model.eval()
    out = [model(b.x).argmax(1).cpu() for b in loader]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, loader: BatchLoader, dist: DistInfo | None = None) -> float:
    """Fraction of `loader`'s images on which `a` and `b` predict the same class (top-1)."""
    was = a.training, b.training
    a.eval()
    b.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=loader.device)
    for batch in loader:
        stats[0] += (a(batch.x).argmax(1) == b(batch.x).argmax(1)).sum()
        stats[1] += len(batch.x)
    a.train(was[0])
    b.train(was[1])
    if dist is not None:
        all_reduce_sum(stats, dist)
    return stats[0].item() / max(1.0, stats[1].item())
