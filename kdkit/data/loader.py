"""The in-memory batch loader.

Images stay uint8 in memory (on the training device when it is a GPU) and become normalised float
batches on the fly. The epoch's order comes from a generator seeded by (seed, epoch), so any epoch and
any step inside it can be reproduced exactly: resuming mid-epoch starts at ``start_step``. Under
torchrun each process reads its contiguous slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .augment import Augment, normalize
from .images import ImageSet


@dataclass
class Batch:
    """One batch: images ``x``, labels ``y`` (None in unlabeled views), and dataset indices."""

    x: torch.Tensor
    y: torch.Tensor | None
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix-style), so nearby seeds give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class EpochOrder:
    """What both loaders share: their set-up (this rank's share of each global batch, device, normalisation,
    memory format), the batches per epoch and the epoch's seeded order; subclasses give ``iterate``."""

    def __init__(self, data: Any, batch_size: int, *, shuffle: bool, drop_last: bool, augment: Any, seed: int,
                 device: torch.device | str, rank: int, world: int, normalize: bool, channels_last: bool,
                 mean: list[float], std: list[float]):
        self.data = data
        self.batch_size = min(batch_size, len(data)) if drop_last else batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.augment = augment if augment is not None and augment.active else None
        self.seed, self.epoch = seed, 0
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self.normalize = normalize
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)

    def __len__(self) -> int:
        n = len(self.data)
        if n == 0:
            return 0
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.data))
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return torch.randperm(len(self.data), generator=g)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(0)

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        raise NotImplementedError


class BatchLoader(EpochOrder):
    def __init__(self, data: ImageSet, batch_size: int, *, shuffle: bool, drop_last: bool,
                 mean: list[float], std: list[float], augment: Augment | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", rank: int = 0, world: int = 1, normalize: bool = True,
                 channels_last: bool = False):
        super().__init__(data, batch_size, shuffle=shuffle, drop_last=drop_last, augment=augment, seed=seed,
                         device=device, rank=rank, world=world, normalize=normalize, channels_last=channels_last,
                         mean=mean, std=std)
        self.images = data.images.to(self.device) if self.device.type != "cpu" else data.images
        self.labels = None if data.labels is None else data.labels.to(self.device)

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches of the current epoch from step `start_step` on."""
        order = self.order()
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            total = len(idx)
            lo, hi = (self.rank * total) // self.world, ((self.rank + 1) * total) // self.world
            local = idx[lo:hi]
            x = self.images[local.to(self.images.device)].float()  # indexing copies: dividing in place is safe
            if self.images.dtype == torch.uint8:
                x.div_(255.0)
            params = {}
            if self.augment is not None:
                g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, step, 1))
                params = {k: v[lo:hi] for k, v in self.augment.sample(total, g).items()}
                x = self.augment.apply(x, params)
            if self.normalize:
                x = normalize(x, self.mean, self.std)
            if self.memory_format is not torch.contiguous_format:
                x = x.contiguous(memory_format=self.memory_format)
            y = None if self.labels is None else self.labels[local.to(self.labels.device)]
            if y is not None and y.dim() == 3 and y.is_floating_point():  # boxes: moved with their images
                if self.augment is not None:
                    y = self.augment.apply_boxes(y, params, x.shape[-2], x.shape[-1])
            elif y is not None and y.dim() == 3:  # label maps: cropped and flipped with their images
                if self.augment is not None:
                    y = self.augment.apply_maps(y, params)
                y = y.long()
            yield Batch(x, y, local)
