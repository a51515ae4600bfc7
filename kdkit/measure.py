"""Model measurements for summaries and reports: parameters, multiply-accumulates, size, CPU latency."""

from __future__ import annotations

import copy
import io
import statistics
import time
from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, repeats: int = 50,
               warmup: int = 10, budget_s: float | None = None) -> float:
    """Median milliseconds per image of ``model(x)`` for a batch of `batch` on the model's device, in eval mode;
    with `budget_s`, timing stops early (after at least 3 runs) once that many seconds are spent."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    x = torch.randn(batch, *input_shape, device=device)
    for _ in range(warmup):
        model(x)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
        if budget_s is not None and len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    model.train(was)
    return 1000.0 * statistics.median(times) / batch


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one image (torch's FLOP counter, halved)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was)
    return int(counter.get_total_flops()) // 2


def size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict as torch.save writes it (its weights on disk)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def model_card(model: nn.Module, input_shape: tuple[int, ...], test_accuracy: float | None) -> dict[str, Any]:
    """Accuracy, parameters, MACs per image, size on disk and CPU latency per image at batch 1 and 64
    (medians, each timed for at most about a second, with torch's current thread count)."""
    cpu = model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()
    return {
        "test_accuracy": test_accuracy, "params": count_params(model), "macs": count_macs(cpu, input_shape),
        "size_bytes": size_bytes(model),
        "cpu_latency_ms_batch1": round(latency_ms(cpu, input_shape, 1, repeats=50, warmup=3, budget_s=1.0), 4),
        "cpu_latency_ms_per_image_batch64": round(latency_ms(cpu, input_shape, 64, repeats=20, warmup=2,
                                                             budget_s=1.0), 4),
    }
