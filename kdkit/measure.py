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
def latency_stats(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, repeats: int = 50,
                  warmup: int = 10, budget_s: float | None = None) -> dict[str, float]:
    """Milliseconds per image of ``model(x)`` for a batch of `batch` on the model's device, in eval mode, after
    `warmup` untimed calls: the median and the quartiles of up to `repeats` timed calls (with `budget_s`,
    timing stops once that many seconds are spent, after at least 5 calls)."""
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
        if budget_s is not None and len(times) >= 5 and time.perf_counter() - start > budget_s:
            break
    model.train(was)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    scale = 1000.0 / batch
    return {"median": scale * statistics.median(times), "q1": scale * q[0], "q3": scale * q[2], "calls": len(times)}


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, repeats: int = 50,
               warmup: int = 10, budget_s: float | None = None) -> float:
    """The median of :func:`latency_stats`."""
    return latency_stats(model, input_shape, batch, repeats, warmup, budget_s)["median"]


def busy_note(stats: list[dict[str, float]], max_spread: float = 0.5) -> str | None:
    """Why CPU timings taken now should not be trusted, or None: another process kept the cores busy (the
    1-minute load average above half the cores, kdkit's own process counted), or the timed calls spread
    widely (interquartile range above `max_spread` of the median)."""
    import os

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load > 1.0 + 0.5 * cores:
        return f"the machine was busy (1-minute load {load:.1f} on {cores} cores): CPU timings are not reliable"
    wide = [s for s in stats if s["median"] > 0 and (s["q3"] - s["q1"]) / s["median"] > max_spread]
    if wide:
        return (f"the timed calls spread widely (interquartile range up to "
                f"{max((s['q3'] - s['q1']) / s['median'] for s in wide):.0%} of the median): CPU timings are not "
                "reliable")
    return None


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


def model_card(model: nn.Module, input_shape: tuple[int, ...], test_accuracy: float | None,
               metric: str = "accuracy", latency_budget_s: float = 2.0) -> dict[str, Any]:
    """The test score (``test_<metric>``: accuracy, or the task's primary metric), parameters, MACs per image,
    size on disk and CPU latency per image at batch 1 and 64 (median and quartiles after 10 and 3 warm-up
    calls; timing stops after about `latency_budget_s` seconds each, with torch's current thread count). With a
    budget of 0 the latency fields are None."""
    cpu = model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()
    card: dict[str, Any] = {f"test_{metric}": test_accuracy, "params": count_params(model),
                            "macs": count_macs(cpu, input_shape), "size_bytes": size_bytes(model)}
    stats = ([latency_stats(cpu, input_shape, 1, repeats=200, warmup=10, budget_s=latency_budget_s),
              latency_stats(cpu, input_shape, 64, repeats=40, warmup=3, budget_s=latency_budget_s)]
             if latency_budget_s > 0 else [])
    for key, st in zip(("cpu_latency_ms_batch1", "cpu_latency_ms_per_image_batch64"), stats or [None, None]):
        card[key] = round(st["median"], 4) if st else None
        card[f"{key}_quartiles"] = [round(st["q1"], 4), round(st["q3"], 4)] if st else None
    card["_latency_stats"] = stats
    return card
