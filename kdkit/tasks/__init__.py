"""Tasks: what a model's output means, how it is supervised and how it is scored.

A :class:`~kdkit.tasks.base.Task` owns the target format, the supervised loss, the metrics (with one primary
metric, the one validation selects on), the output contract checked before training and the alignment of a
model's output to its targets. The engine and the methods ask the run's task; they never branch on its name.

======================  ==========================================  ================================
task                    targets                                     primary metric
======================  ==========================================  ================================
``classification``      one class index per sample, ``[N]``          ``accuracy`` (top-1)
``segmentation``        one class index per pixel, ``[N, H, W]``     ``miou`` (mean IoU)
``detection``           boxes ``[N, M, 5]`` (fractions, class)       ``map`` (COCO mAP@[.5:.95])
``embedding``           one identity per sample, ``[N]``             ``tar_far1e-3`` (or embedding.metric)
======================  ==========================================  ================================
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, did_you_mean
from .base import Meter, Task
from .classification import Classification
from .detection import Detection
from .embedding import Embedding
from .segmentation import Segmentation

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Segmentation(), Detection(), Embedding())}
#: tasks named in the configuration that are planned but not built yet
PLANNED: tuple[str, ...] = ()


def get_task(name: str) -> Task:
    """The task called `name`; a ConfigError names the valid ones."""
    if name in TASKS:
        return TASKS[name]
    if name in PLANNED:
        raise ConfigError(f"task {name!r} is not available yet; tasks: {', '.join(TASKS)}")
    raise ConfigError(f"unknown task {name!r}{did_you_mean(name, TASKS)}; tasks: {', '.join(TASKS)}")


def task_for(info: Any) -> Task:
    """The task of a run's data (kdkit.data.DataInfo), with its options (the embedding section)."""
    t = get_task(info.task)
    return t.configured(info.embedding) if getattr(info, "embedding", None) else t


__all__ = ["TASKS", "Classification", "Detection", "Embedding", "Meter", "Segmentation", "Task", "get_task", "task_for"]
