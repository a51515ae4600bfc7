"""A model's metrics on a split, by its task (sharded across processes under torchrun)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data import BatchLoader
from ..tasks import TASKS, Task
from .distributed import DistInfo, all_reduce_sum


def _task(task: Task | str | None) -> Task:
    return TASKS["classification"] if task is None else (TASKS[task] if isinstance(task, str) else task)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, dist: DistInfo | None = None,
             task: Task | str | None = None) -> dict[str, Any]:
    """The task's metrics of `model` over `loader` (labels required): for classification top-1 ``accuracy``,
    for segmentation ``miou``, ``pixel_accuracy`` and ``per_class_iou``; always the mean supervised ``loss``
    and the ``count`` of scored samples (pixels for segmentation)."""
    t = _task(task)
    was = model.training
    model.eval()
    meter = None
    for batch in loader:
        assert batch.y is not None
        out = t.align(model(batch.x), batch.x)
        if meter is None:
            meter = t.meter(out.shape[1], loader.device)
            meter.bind(getattr(loader, "data", None))
        meter.update(out, batch.y, batch.index)
    model.train(was)
    if meter is None:  # an empty split: nothing scored
        return {t.primary: 0.0, "loss": float("nan"), "count": 0}
    if dist is not None and dist.enabled:
        meter.reduce(dist)
    return meter.result()


@torch.no_grad()
def predictions(model: nn.Module, loader: BatchLoader, task: Task | str | None = None) -> torch.Tensor:
    """Hard predictions over `loader` in order (single process): a class per sample, or per pixel."""
    t = _task(task)
    was = model.training
    model.eval()
    out = [t.predict(t.align(model(b.x), b.x)).cpu() for b in loader]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, loader: BatchLoader, dist: DistInfo | None = None,
              task: Task | str | None = None) -> float:
    """Fraction of `loader`'s predictions (images, or pixels for dense tasks) on which `a` and `b` agree."""
    t = _task(task)
    was = a.training, b.training
    a.eval()
    b.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=loader.device)
    for batch in loader:
        pa, pb = (t.predict(t.align(m(batch.x), batch.x)) for m in (a, b))
        stats[0] += (pa == pb).sum()
        stats[1] += pa.numel()
    a.train(was[0])
    b.train(was[1])
    if dist is not None:
        all_reduce_sum(stats, dist)
    return stats[0].item() / max(1.0, stats[1].item())
