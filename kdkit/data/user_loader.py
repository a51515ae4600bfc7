"""A user's own ``DataLoader`` (or any re-iterable of batches, an ``IterableDataset``'s loader included) as a split
of a run: kdkit iterates it every epoch exactly as it is, so its augmentation runs every epoch and its batch
size, sampler and collate function are kept. Nothing is collected into memory.

* Batches are ``(samples, labels)`` (or samples alone, for unlabeled data); uint8 samples are divided by
  255 and normalised like kdkit's own data, float samples go to the models as given.
* Under torchrun each process iterates its own loader: give it a ``DistributedSampler``. kdkit calls
  ``set_epoch(epoch)`` on the loader's sampler (or batch sampler) when it has one, every epoch.
* Resuming mid-epoch iterates the epoch again up to the step the checkpoint was taken at (skipping those
  batches): exact when the loader's order is reproducible (a seeded generator, or ``set_epoch``).
* A loader without ``len`` (an ``IterableDataset``) is read once before training to count its batches
  (``data.epoch_steps`` saves that pass).
* The teacher cache is off for these splits: kdkit cannot tell whether the samples repeat.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..errors import DataError
from .augment import normalize
from .loader import Batch


def split_batch(item: Any, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(samples, labels or None) of one batch of a user's loader."""
    if isinstance(item, (tuple, list)) and len(item) >= 1:
        x, y = item[0], (item[1] if len(item) > 1 else None)
    elif isinstance(item, dict) and ("image" in item or "input" in item):
        x, y = item.get("image", item.get("input")), item.get("label")
    else:
        x, y = item, None
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{what}: a batch holds a {type(x).__name__}, not a tensor of samples; its collate "
                        "function must return (samples, labels) tensors")
    if y is not None:
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"{what}: labels must be integer class indices, got {y.dtype}")
    return x, y


class UserLoader:
    """A split backed by the user's loader (see the module docstring)."""

    def __init__(self, loader: Iterable[Any], what: str, classes: list[str], steps: int | None = None):
        self.loader, self.what, self.classes = loader, what, classes
        x, y = split_batch(next(iter(loader)), what)
        self.labeled = y is not None
        self.scale = 255.0 if x.dtype == torch.uint8 else 1.0
        self.shape = tuple(x.shape[1:])
        self.first_batch = (x, y)
        self.steps = steps if steps is not None else self._count()
        dataset = getattr(loader, "dataset", None)
        try:
            self.size = len(dataset) if dataset is not None else self.steps * len(x)
        except TypeError:  # an IterableDataset without len
            self.size = self.steps * len(x)
        self.labels = None  # not known without reading the data

    def _count(self) -> int:
        try:
            return len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            return sum(1 for _ in self.loader)

    def __len__(self) -> int:
        return self.size

    @property
    def is_images(self) -> bool:
        return len(self.shape) == 3

    def unlabeled(self) -> UserLoader:
        view = UserLoader.__new__(UserLoader)
        view.__dict__.update(self.__dict__)
        view.labeled = False
        return view


class UserBatchLoader:
    """Iterates a :class:`UserLoader` for the engine, with the interface of :class:`~kdkit.data.BatchLoader`."""

    #: the samples may change from epoch to epoch (the user's own augmentation): no teacher cache
    augment = "the user's loader"

    def __init__(self, data: UserLoader, *, mean: list[float], std: list[float], device: torch.device | str = "cpu",
                 normalize: bool = True, channels_last: bool = False):
        self.data = data
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.normalize = normalize
        self.channels_last = channels_last
        self.batch_size = getattr(data.loader, "batch_size", None) or len(data.first_batch[0])
        self.epoch = 0

    def __len__(self) -> int:
        return self.data.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in (getattr(self.data.loader, "sampler", None), getattr(self.data.loader, "batch_sampler", None),
                  getattr(getattr(self.data.loader, "batch_sampler", None), "sampler", None)):
            if s is not None and hasattr(s, "set_epoch"):
                s.set_epoch(epoch)

    def order(self) -> None:
        return None

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(0)

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        for step, item in enumerate(self.data.loader):
            if step < start_step:
                continue
            if step >= self.data.steps:
                break
            x, y = split_batch(item, self.data.what)
            x = x.to(self.device, non_blocking=True).float()
            if self.data.scale != 1.0:
                x.div_(self.data.scale)
            if self.normalize:
                x = normalize(x, self.mean, self.std)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            labels = y.to(self.device).long() if (y is not None and self.data.labeled) else None
            yield Batch(x, labels, None)
