"""Model measurements for summaries and reports: parameters and CPU latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, repeats: int = 50,
               warmup: int = 10) -> float:
    """Median milliseconds per image of ``model(x)`` for a batch of `batch` on the CPU, in eval mode."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    x = torch.randn(batch, *input_shape, device=device)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    model.train(was)
    return 1000.0 * statistics.median(times) / batch
