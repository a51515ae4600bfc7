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
======================  ==========================================  ================================
"""

from __future__ import annotations

from ..errors import ConfigError, did_you_mean
from .base import Meter, Task
from .classification import Classification
from .detection import Detection
from .segmentation import Segmentation

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Segmentation(), Detection())}
#: tasks named in the configuration that are planned but not built yet
PLANNED = ("embedding",)


def get_task(name: str) -> Task:
    """The task called `name`; a ConfigError names the valid ones."""
    if name in TASKS:
        return TASKS[name]
    if name in PLANNED:
        raise ConfigError(f"task {name!r} is not available yet; tasks: {', '.join(TASKS)}")
    raise ConfigError(f"unknown task {name!r}{did_you_mean(name, TASKS)}; tasks: {', '.join(TASKS)}")


__all__ = ["TASKS", "Classification", "Detection", "Meter", "Segmentation", "Task", "get_task"]
