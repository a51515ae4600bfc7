"""Splits from the Python objects users already have: a ``DataLoader`` or any iterable of ``(samples, labels)``
batches (or of samples alone), a map-style dataset of ``(sample, label)``, or a ``(samples, labels)`` pair of
tensors or NumPy arrays. Samples are images ``[C, H, W]``, vectors ``[D]`` or sequences ``[C, L]``.

* Tensors and arrays are held in memory.
* A ``DataLoader`` (or another iterable of batches) is iterated every epoch as it is (its augmentation,
  batch size, sampler and collate function kept: :mod:`kdkit.data.user_loader`); ``data.in_memory=true``
  collects it once instead.
* A map-style dataset is collected into memory when its decoded size is at most ``data.memory_limit_mb``
  (``data.in_memory=auto``, said in the run log), and read sample by sample in worker processes otherwise
  (its own transforms then run every epoch).

Collected samples: uint8 pixels stay uint8 (0..255), anything else becomes float32 and is used as given, so a
loader that already normalises its images feeds the models exactly what they were trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from . import DataBundle, make_bundle
from .images import ImageSet
from .splits import stratified_split


def _tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise DataError(f"{what}: expected a tensor or NumPy array, got {type(x).__name__}")


def _is_pair(data: Any) -> bool:
    """(images [N, ...], labels [N] or label maps [N, H, W]): two arrays as long as each other."""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(d, (torch.Tensor, np.ndarray)) for d in data)
            and data[0].ndim >= 2 and data[1].ndim in (1, 3) and len(data[0]) == len(data[1]))


def _max_label(labels: torch.Tensor) -> int:
    """The largest class index (255 in label maps marks ignored pixels, not a class)."""
    if labels.dim() > 1:
        labels = labels[labels != 255]
    return int(labels.max()) if labels.numel() else -1


def _batches_of(data: Any) -> bool:
    """Whether iterating `data` gives batches (a DataLoader, a generator...) rather than samples (a map-style
    dataset, a list of samples)."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, DataLoader):
        return True
    return not (isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")))


def _in_order(data: Any) -> Any:
    """A shuffling DataLoader over a map-style dataset, read in the dataset's order instead: kdkit reshuffles
    every epoch with its own seeded order, and the order in memory must not depend on the global RNG (or two
    runs with the same seed would differ)."""
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler

    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler) \
            and not isinstance(data.dataset, IterableDataset):
        return DataLoader(data.dataset, batch_size=data.batch_size or 1, shuffle=False, collate_fn=data.collate_fn)
    return data


def _pieces(data: Any, what: str) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The image and label pieces of `data` (batches, samples or one pair), labels None when it has none."""
    data = _in_order(data)
    if _is_pair(data):
        return [_tensor(data[0], what)], [_tensor(data[1], what)]
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return [_tensor(data, what)], None
    if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
        raise DataError(f"{what}: expected a DataLoader, an iterable of (images, labels) batches, a dataset of "
                        f"(image, label) samples, or an (images, labels) pair; got {type(data).__name__}")
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    labeled: bool | None = None
    samples = None if isinstance(data, list) else not _batches_of(data)  # lists: by the items' shapes
    for i, item in enumerate(data):
        if isinstance(item, (tuple, list)):
            x, y = item[0], (item[1] if len(item) > 1 else None)
        elif isinstance(item, dict) and "image" in item:
            x, y = item["image"], item.get("label")
        else:
            x, y = item, None
        if labeled is None:
            labeled = y is not None
        elif labeled != (y is not None):
            raise DataError(f"{what}: item {i} {'has no' if labeled else 'has a'} label unlike the items before it")
        x = _tensor(x, f"{what} item {i}")
        single = x.dim() == 3 if samples is None else samples
        xs.append(x.unsqueeze(0) if single else x)
        if y is not None:
            y = torch.as_tensor(y).detach().cpu()
            if single:
                ys.append(y.reshape(1) if y.dim() == 0 else y.unsqueeze(0))  # a class index, or one label map
            else:
                ys.append(y if y.dim() == 3 else y.reshape(-1))  # label maps [B, H, W], or class indices
    if not xs:
        raise DataError(f"{what} is empty")
    return xs, (ys if labeled else None)


def to_imageset(data: Any, what: str) -> ImageSet:
    """One in-memory image set from `data` (see the module docstring); a DataError names what is wrong."""
    xs, ys = _pieces(data, what)
    shapes = {tuple(x.shape[1:]) for x in xs}
    if any(x.dim() < 2 for x in xs) or len(shapes) != 1:
        found = sorted({tuple(x.shape) for x in xs})[:3]
        raise DataError(f"{what}: samples must all have one shape (batches [N, ...] of images [C, H, W], vectors "
                        f"[D] or sequences [C, L]); got shapes {found}; resize images to one size first")
    images = torch.cat(xs)
    if images.dtype != torch.uint8:
        images = images.float()
        if not torch.isfinite(images).all():
            raise DataError(f"{what}: the samples hold NaN or infinite values")
    labels = None
    if ys is not None:
        labels = torch.cat(ys)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise DataError(f"{what}: labels must be integer class indices, got {labels.dtype}")
        labels = labels.long()
        if len(labels) != len(images):
            raise DataError(f"{what}: {len(images)} images but {len(labels)} labels")
        if labels.numel() and int(labels.min()) < 0:
            raise DataError(f"{what}: negative label {int(labels.min())}; labels are class indices 0..K-1")
    return ImageSet(images, labels)


def how_held(cfg: DataConfig, data: Any, what: str) -> str:
    """'memory', 'loader' (iterated as it is) or 'dataset' (read sample by sample) for one user object, with
    data.in_memory; the choice is said in the run log."""
    from torch.utils.data import IterableDataset

    if data is None or _is_pair(data) or isinstance(data, (torch.Tensor, np.ndarray)) or cfg.in_memory is True:
        return "memory"
    if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
        raise DataError(f"{what}: expected a DataLoader, an iterable of (samples, labels) batches, a dataset of "
                        f"(sample, label) items, or a (samples, labels) pair; got {type(data).__name__}")
    if isinstance(data, IterableDataset) or _batches_of(data) or isinstance(data, list):
        return "memory" if isinstance(data, list) else "loader"
    if cfg.in_memory is False:
        return "dataset"
    item = data[0]
    first = _tensor(item[0] if isinstance(item, (tuple, list)) else item, f"{what} item 0")
    size_mb = len(data) * first.numel() * (1 if first.dtype == torch.uint8 else 4) / 2**20
    return "memory" if size_mb <= cfg.memory_limit_mb else "dataset"


def memory_bundle(cfg: DataConfig, train: Any, val: Any, test: Any,
                  num_classes: int | Callable[[torch.Tensor], int] | None, reads_training_data: bool = True
                  ) -> DataBundle:
    """A :class:`DataBundle` from the user's objects.

    `test` is required for data-free runs (the only images they see); otherwise, when it is None, a
    ``data.test_split`` fraction of `train` is held out (stratified, ``data.split_seed``). `val` replaces
    the validation split carved with ``data.val_split``. Labels must lie in 0..K-1, K being `num_classes`:
    a count, a function of a batch of images (the teacher's output size), or None for the labels' maximum + 1."""
    if reads_training_data and train is None:
        raise DataError("train_data is None: this method learns from training images; pass a DataLoader, "
                        "an iterable of (images, labels) or an (images, labels) pair")
    if not reads_training_data and train is not None:
        raise DataError("this method is data-free and reads no training images: pass train_data=None "
                        "(test_data gives the evaluation images)")
    objs = {"train": train, "val": val, "test": test}
    held = {name: how_held(cfg, obj, f"{name}_data") for name, obj in objs.items()}
    if any(h != "memory" for h in held.values()):
        return streamed_bundle(cfg, objs, held, num_classes)
    sets: dict[str, ImageSet | None] = {"train": None, "val": None, "test": None}
    if train is not None:
        sets["train"] = to_imageset(train, "train_data")
    for name, obj in (("val", val), ("test", test)):
        if obj is not None:
            sets[name] = to_imageset(obj, f"{name}_data")
            if sets[name].labels is None:  # type: ignore[union-attr]
                raise DataError(f"{name}_data has no labels: evaluation needs (images, labels)")
    given = [s for s in sets.values() if s is not None]
    if callable(num_classes):
        num_classes = num_classes(given[0].images[:2].float() / given[0].scale)
    elif num_classes is None:
        num_classes = 1 + max(_max_label(s.labels) for s in given if s.labels is not None and s.labels.numel())
    classes = [str(i) for i in range(num_classes)]
    for name, s in sets.items():
        if s is not None:
            s.classes = classes
            if s.labels is not None and s.labels.numel() and _max_label(s.labels) >= num_classes:
                raise DataError(f"{name}_data: label {_max_label(s.labels)} but the model outputs {num_classes} "
                                "classes; labels must be 0..K-1 with K the model's output size"
                                + (" (255: ignored pixels)" if s.labels.dim() > 1 else ""))
    tr = sets["train"]
    if sets["test"] is None:
        if tr is None or tr.labels is None:
            raise DataError("give test_data (images and labels) to evaluate on: "
                            + ("a data-free run has no training images to hold it out of"
                               if tr is None else "train_data has no labels to hold a test split out of"))
        keep, held = stratified_split(tr.labels, cfg.test_split, cfg.split_seed)
        tr, sets["test"] = tr.subset(keep), tr.subset(held)
    if (tr is None or tr.labels is None) and sets["val"] is None:
        cfg.val_split = 0.0  # nothing to carve a labeled validation split from
    test_set = sets["test"]
    assert test_set is not None
    if tr is not None and tr.shape != test_set.shape:
        raise DataError(f"train_data images are {tr.shape} but test images {test_set.shape}; give both one size")
    return make_bundle(cfg, tr, test_set, reads_training_data, val=sets["val"])


def streamed_bundle(cfg: DataConfig, objs: dict[str, Any], held: dict[str, str],
                    num_classes: int | Callable[[torch.Tensor], int] | None) -> DataBundle:
    """A bundle whose splits are (some of) the user's loaders and datasets, read every epoch."""
    from .stream import DatasetSampleSet
    from .user_loader import UserLoader

    if objs["test"] is None:
        raise DataError("give test_data: kdkit does not split a training loader it iterates as it is (or set "
                        "data.in_memory=true to collect train_data and hold a test split out of it)")
    name0 = next(n for n in ("train", "val", "test") if objs[n] is not None)
    first_x = _first_samples(objs[name0], held[name0], f"{name0}_data")
    if callable(num_classes):
        num_classes = num_classes(first_x[:2].float() / (255.0 if first_x.dtype == torch.uint8 else 1.0))
    if num_classes is None:
        raise DataError("kdkit cannot count the classes of data it streams before training: give the model as an "
                        "nn.Module or a kdkit model file (its output size is the class count)")
    classes = [str(i) for i in range(num_classes)]
    sets: dict[str, Any] = {}
    notes = []
    for name, obj in objs.items():
        if obj is None:
            sets[name] = None
        elif held[name] == "memory":
            sets[name] = to_imageset(obj, f"{name}_data")
            sets[name].classes = classes
        elif held[name] == "loader":
            sets[name] = UserLoader(obj, f"{name}_data", classes, cfg.epoch_steps if name == "train" else None)
            notes.append(f"{name}_data: your loader, iterated every epoch as it is ({sets[name].steps} batches)")
        else:
            sets[name] = DatasetSampleSet(obj, classes)
            notes.append(f"{name}_data: your dataset, read sample by sample in worker processes "
                         f"(data.in_memory={cfg.in_memory})")
    for name in ("val", "test"):
        s = sets[name]
        labeled = getattr(s, "labeled", None) if not isinstance(s, ImageSet) else s.labels is not None
        if s is not None and labeled is False:
            raise DataError(f"{name}_data has no labels: evaluation needs (samples, labels)")
    from . import make_bundle

    bundle = make_bundle(cfg, sets["train"], sets["test"], objs["train"] is not None, val=sets["val"])
    bundle.notes = notes + bundle.notes
    bundle.path = "stream"
    return bundle


def _first_samples(obj: Any, held: str, what: str) -> torch.Tensor:
    if held == "loader":
        from .user_loader import split_batch

        return split_batch(next(iter(obj)), what)[0]
    if held == "dataset":
        item = obj[0]
        return _tensor(item[0] if isinstance(item, (tuple, list)) else item, what).unsqueeze(0)
    return to_imageset(obj, what).images[:2]
