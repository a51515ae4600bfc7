"""The streaming path: samples decoded one at a time in ``DataLoader`` worker processes, memory flat in the
dataset's size.

A :class:`SampleSet` is a map-style set whose labels are known without decoding (file lists, image folders),
so the seeded validation/test splits and per-class subsets work exactly as on the in-memory path. The
:class:`StreamLoader` reads it like the in-memory :class:`~kdkit.data.BatchLoader`: a seeded order per
epoch, the global batch split across torchrun ranks (every sample seen once per epoch over all ranks),
``iterate(start_step)`` resuming mid-epoch at the exact next batch, and per-sample augmentation seeded by
(seed, epoch, sample), so the result does not depend on which worker decoded what. Workers
(``data.workers``) persist across epochs; batches are prefetched, pinned when training on a GPU. Training on
CPU with workers, the batch becomes the model's normalised float input in the worker; on a GPU it travels as
stored (uint8, a quarter of the bytes) and is converted on the device. File paths are held in a
:class:`~kdkit.data.pathtable.PathTable`, so the workers share them with the main process instead of copying.

A file that cannot be decoded stops the run with the file named (the last checkpoint is untouched), or,
with ``data.on_bad_file: skip``, is left out of its batch with a warning and counted (``summary.json``:
``data_skipped_files``). A worker that dies gives one error naming what to try, never a hang.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, warn
from .augment import normalize_
from .images import ImageSet, channel_stats
from .loader import Batch, EpochOrder, _mix
from .natural import SampleAugment, image_sample
from .pathtable import PathTable

#: seconds a batch may take before the loader gives up on its workers (a hung worker is an error, not a hang)
WORKER_TIMEOUT_S = 600


class SampleSet:
    """Samples decoded on demand. Subclasses give ``__len__``, :meth:`load` and, when known, ``labels``."""

    classes: list[str]
    labels: torch.Tensor | None = None
    #: what stored values are divided by to give the model's input scale (255 for uint8 pixels)
    scale: float = 255.0

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int, augment: SampleAugment | None, g: torch.Generator | None) -> tuple[torch.Tensor, int]:
        """Sample `i` (uint8 or float32) and its label (-1 when unknown or unlabeled)."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        """What sample `i` is called in messages (a file path)."""
        return f"sample {i}"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.load(0, None, None)[0].shape)

    @property
    def is_images(self) -> bool:
        return len(self.shape) == 3

    @property
    def task(self) -> str:
        """"detection" when the labels are boxes ``[N, M, 5]`` (float), "segmentation" when they are label maps
        decoded with the samples (``labels`` is then a per-sample integer placeholder ``[N, 1, 1]``), else
        "classification"."""
        from . import target_task

        return target_task(self.labels)

    def subset(self, index: torch.Tensor) -> SampleSet:
        return _View(self, index, labeled=self.labels is not None)

    def unlabeled(self) -> SampleSet:
        return _View(self, torch.arange(len(self)), labeled=False)

    def decoded_bytes(self) -> int:
        """The memory the whole set would take decoded (from the first sample's size)."""
        x = self.load(0, None, None)[0]
        return len(self) * x.numel() * x.element_size()

    def to_memory(self) -> ImageSet:
        """Decode every sample into one in-memory set (data.in_memory)."""
        x0, y0 = self.load(0, None, None)
        maps = self.labels is not None and self.labels.dim() > 1  # label maps come with their samples
        # filled in place: a list of samples then stacked would hold the set twice at its peak
        images = torch.empty((len(self), *x0.shape), dtype=x0.dtype)
        labels = torch.empty((len(self), *y0.shape), dtype=y0.dtype) if maps else self.labels
        for i in range(len(self)):
            x, y = (x0, y0) if i == 0 else self.load(i, None, None)
            if x.shape != x0.shape:
                raise DataError(f"the samples have different shapes ({tuple(x0.shape)} for {self.name(0)}, "
                                f"{tuple(x.shape)} for {self.name(i)}); set data.image_size")
            images[i] = x
            if maps:
                labels[i] = y  # type: ignore[index]
        return ImageSet(images, labels, self.classes)


class _View(SampleSet):
    """Some samples of another set, in a given order; `labeled=False` hides the labels."""

    def __init__(self, base: SampleSet, index: torch.Tensor, labeled: bool = True):
        self.base, self.index = base, index.long()
        self.classes, self.scale = base.classes, base.scale
        self.labels = base.labels[self.index] if (labeled and base.labels is not None) else None

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int, augment: SampleAugment | None, g: torch.Generator | None) -> tuple[torch.Tensor, int]:
        x, y = self.base.load(int(self.index[i]), augment, g)
        return x, (y if self.labels is not None else -1)

    def name(self, i: int) -> str:
        return self.base.name(int(self.index[i]))


class TensorSampleSet(SampleSet):
    """An in-memory set read through the streaming path (``data.in_memory: false`` on a small dataset)."""

    def __init__(self, data: ImageSet):
        self.data, self.classes, self.labels, self.scale = data, data.classes, data.labels, data.scale

    def __len__(self) -> int:
        return len(self.data)

    def load(self, i: int, augment: SampleAugment | None, g: torch.Generator | None) -> tuple[torch.Tensor, Any]:
        from .natural import augment_sample

        x = self.data.images[i]
        if self.labels is not None and self.labels.dim() > 1:  # a label map or boxes: augmented with the image
            y = self.labels[i]
            if augment is not None and g is not None:
                from .natural import augment_with_target

                x, y = augment_with_target(x, y, augment, g)
            return x, y
        if augment is not None and g is not None and x.dim() == 3:
            x = augment_sample(x, augment, g)
        return x, (int(self.labels[i]) if self.labels is not None else -1)


class FileSampleSet(SampleSet):
    """Image files with labels known from their folder or list, decoded by Pillow when read."""

    def __init__(self, paths: Sequence[str | Path], labels: torch.Tensor | None, classes: list[str], mode: str,
                 size: int | None, crop: float = 1.0):
        if size is not None:
            from .images import check_fits

            check_fits(256 * (3 if mode == "RGB" else 1) * size * size * 4,
                       f"a batch of 256 images at data.image_size={size}", "choose a smaller data.image_size")
        self.paths = paths if isinstance(paths, PathTable) else PathTable(paths)
        self.labels, self.classes = labels, classes
        self.mode, self.size, self.crop = mode, size, crop
        self.scale = 255.0

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def load(self, i: int, augment: SampleAugment | None, g: torch.Generator | None) -> tuple[torch.Tensor, int]:
        try:
            x = image_sample(self.paths[i], self.mode, self.size, augment, g, self.crop)
        except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for missing, truncated, corrupt files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DataError(f"{self.paths[i]}: not a readable image ({first}); remove or replace it, or set "
                            "data.on_bad_file=skip") from None
        return x, (int(self.labels[i]) if self.labels is not None else -1)


class DatasetSampleSet(SampleSet):
    """A user's map-style ``Dataset`` of ``(sample, label)`` (or samples alone): its own transforms run when a
    sample is read, every epoch; kdkit adds no augmentation of its own."""

    def __init__(self, dataset: Any, classes: list[str], labels: torch.Tensor | None = None,
                 labeled: bool = True, scale: float | None = None):
        self.dataset, self.classes, self.labels, self.labeled = dataset, classes, labels, labeled
        if scale is None:
            x = self._item(0)[0]
            scale = 255.0 if x.dtype == torch.uint8 else 1.0
        self.scale = scale

    def __len__(self) -> int:
        return len(self.dataset)

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[i]
        x, y = (item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)
        x = torch.as_tensor(x)
        if x.dtype != torch.uint8:
            x = x.float()
        return x, (int(y) if (y is not None and self.labeled) else -1)

    def load(self, i: int, augment: SampleAugment | None, g: torch.Generator | None) -> tuple[torch.Tensor, int]:
        return self._item(i)


# ---- the loader ---------------------------------------------------------------------------------------
class _Read(torch.utils.data.Dataset):
    """What the DataLoader's workers see: (index, seed) -> (sample, label, index), or a marker for a bad file."""

    def __init__(self, data: SampleSet, augment: SampleAugment | None, skip_bad: bool):
        self.data, self.augment, self.skip_bad = data, augment, skip_bad

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        i, seed = key
        g = torch.Generator().manual_seed(seed) if self.augment is not None else None
        try:
            x, y = self.data.load(i, self.augment, g)
        except DataError as e:
            if self.skip_bad:
                return (None, -1, i, str(e).split(":", 1)[0])
            raise
        return (x, y, i, None)


class _Collate:
    """Stacks a batch; with `prep` (CPU training with workers) also turns it into the model's normalised float32
    input there, in the worker, leaving the main process to the models. On a GPU the batch travels as stored
    (uint8 is a quarter of the bytes) and is converted on the device."""

    def __init__(self, prep: _Prep | None):
        self.prep = prep

    def __call__(self, items: list[tuple[Any, ...]]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor,
                                                               list[str]]:
        x, y, index, bad = _collate(items)
        return (x if x is None or self.prep is None else self.prep(x)), y, index, bad


class _Prep:
    """Stored samples -> model input: float32, divided by the set's scale, normalised, in the memory format."""

    def __init__(self, scale: float, mean: torch.Tensor | None, std: torch.Tensor | None,
                 memory_format: torch.memory_format):
        self.scale, self.mean, self.std, self.memory_format = scale, mean, std, memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() if x.dtype != torch.float32 else x.clone()  # one new tensor, then in place
        if self.scale != 1.0:
            x.div_(self.scale)
        if self.mean is not None and self.std is not None:
            normalize_(x, self.mean, self.std)
        if self.memory_format is not torch.contiguous_format and x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x


def _collate(items: list[tuple[Any, ...]]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[str]]:
    bad = [it[3] for it in items if it[0] is None]
    good = [it for it in items if it[0] is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad
    shapes = {tuple(it[0].shape) for it in good}
    if len(shapes) != 1:
        raise DataError(f"samples of one batch have different shapes {sorted(shapes)[:3]}; set data.image_size so "
                        "that every image is resized to one size")
    ys = [it[1] for it in good]
    labels = torch.stack(ys) if isinstance(ys[0], torch.Tensor) else torch.tensor(ys)  # label maps, or indices
    return torch.stack([it[0] for it in good]), labels, torch.tensor([it[2] for it in good]), bad


class _Batches:
    """The batch sampler: this rank's slice of every global batch of the current epoch, from `start` on. Set
    before each pass; it runs in the main process, so persistent workers see the new epoch."""

    def __init__(self, loader: StreamLoader):
        # a weak reference: a cycle loader -> DataLoader -> sampler -> loader would leave the loader to the
        # garbage collector, whose teardown order stalls each worker's shutdown for seconds
        self._loader = weakref.ref(loader)
        self.start = 0

    @property
    def loader(self) -> StreamLoader:
        ld = self._loader()
        assert ld is not None, "the batch sampler outlived its loader"
        return ld

    def __len__(self) -> int:
        return len(self.loader) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        ld = self.loader  # read what the epoch needs, then let go of the loader (see __init__)
        order, steps, size, rank, world, seed, epoch = (ld.order(), len(ld), ld.batch_size, ld.rank, ld.world,
                                                        ld.seed, ld.epoch)
        del ld
        for step in range(self.start, steps):
            idx = order[step * size:(step + 1) * size].tolist()
            lo, hi = (rank * len(idx)) // world, ((rank + 1) * len(idx)) // world
            yield [(i, _mix(seed, epoch, i, 2)) for i in idx[lo:hi]]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # several workers, each with its own threads, would fight over the cores


def _original_message(e: BaseException) -> str:
    """The message of an exception raised in a worker (PyTorch re-raises it as "Caught X in DataLoader worker
    process N. Original Traceback ...", the original message on the last line)."""
    text = str(e).strip()
    if not text.startswith("Caught "):
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1].strip() if ": " in last else last


class StreamLoader(EpochOrder):
    """Batches of a :class:`SampleSet` through a ``torch.utils.data.DataLoader`` (see the module docstring);
    the same interface as :class:`~kdkit.data.BatchLoader`."""

    def __init__(self, data: SampleSet, batch_size: int, *, shuffle: bool, drop_last: bool, mean: list[float],
                 std: list[float], augment: SampleAugment | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", rank: int = 0, world: int = 1, normalize: bool = True,
                 channels_last: bool = False, workers: int = 0, skip_bad: bool = False):
        super().__init__(data, batch_size, shuffle=shuffle, drop_last=drop_last, augment=augment, seed=seed,
                         device=device, rank=rank, world=world, normalize=normalize, channels_last=channels_last,
                         mean=mean, std=std)
        self.skip_bad = skip_bad
        self.skipped: list[str] = []  # files left out (data.on_bad_file: skip)
        self._sampler = _Batches(self)
        self.workers = workers
        identity = bool((self.mean == 0).all() and (self.std == 1).all())  # data.normalize=false
        keep = normalize and not identity
        self._prep = _Prep(data.scale, self.mean if keep else None, self.std if keep else None,
                           self.memory_format)
        self._prep_in_workers = workers > 0 and self.device.type == "cpu"
        self._loader = torch.utils.data.DataLoader(
            _Read(data, self.augment, skip_bad), batch_sampler=self._sampler,
            collate_fn=_Collate(self._prep if self._prep_in_workers else None),
            num_workers=workers, persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init if workers > 0 else None,
            timeout=WORKER_TIMEOUT_S if workers > 0 else 0)

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        self._sampler.start = start_step
        try:
            for x, y, index, bad in self._loader:
                if bad:
                    self._skipped(bad)
                if x is None:
                    continue
                yield self._batch(x, y, index)
        except DataError as e:
            raise DataError(_original_message(e)) from None
        except RuntimeError as e:
            text = str(e)
            if "DataLoader worker" in text or "DataLoader timed out" in text:
                raise DataError(f"a data-loading worker failed ({text.splitlines()[0][:200]}); rerun with "
                                "data.workers=0 to see the error in the main process") from None
            raise

    def _skipped(self, names: list[str]) -> None:
        for n in names:
            self.skipped.append(n)
            warn(f"{n}: not a readable image; left out of its batch (data.on_bad_file=skip)")

    def _batch(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Batch:
        if not self._prep_in_workers:
            x = self._prep(x.to(self.device, non_blocking=True))
        labels = None if self.data.labels is None else y.to(self.device)
        if labels is not None and not labels.is_floating_point():  # class indices, label maps; boxes stay float
            labels = labels.long()
        return Batch(x, labels, index)


def sample_stats(data: SampleSet, count: int = 512, seed: int = 0,
                 skip_bad: bool = False) -> tuple[list[float], list[float]]:
    """Per-channel mean and std estimated from `count` samples drawn with `seed` (decoded without
    augmentation): a streamed training set is too large to scan for its normalisation. With `skip_bad`,
    unreadable files are passed over (data.on_bad_file: skip)."""
    n = min(count, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    xs = []
    for i in idx:
        try:
            xs.append(data.load(int(i), None, None)[0])
        except DataError:
            if not skip_bad:
                raise
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise DataError(f"the samples have different shapes {sorted(shapes)[:3]}; set data.image_size so that every "
                        "image is resized to one size")
    stacked = torch.stack(xs)
    if data.scale == 1.0 and stacked.dtype == torch.uint8:
        stacked = stacked.float()
    return channel_stats(stacked)
