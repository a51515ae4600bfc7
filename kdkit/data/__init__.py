"""Datasets by name, splits, few-shot views, tensor augmentations and the in-memory batch loader.

``load_data(cfg.data)`` returns a :class:`DataBundle`: the training set (after the validation split and
``train_subset``), the validation and test sets, an unlabeled few-shot view when
``shots_per_class`` is set, the whole labeled training set (split ``train_full``, for a stage that
trains a teacher on everything, e.g. SH-KD's), and :class:`DataInfo` (classes, input shape,
normalisation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch

from ..config import DataConfig
from ..errors import DataError
from . import cifar, coco, digits, filelist, idx, imagefolder, scenes, segfolder, svhn
from .augment import Augment
from .images import ImageSet, channel_stats, resize
from .loader import Batch, BatchLoader
from .splits import per_class, stratified_split

if TYPE_CHECKING:
    from .stream import SampleSet
    from .user_loader import UserLoader


def _memory(cfg: DataConfig, need_train: bool = True) -> tuple[ImageSet | None, ImageSet]:
    raise DataError("data.name=memory means images handed over in Python (kdkit.distill / kdkit.train with your "
                    "own tensors or loaders); there is nothing to read from disk: pick a dataset such as mnist")


#: name -> reader(cfg, need_train) -> (training set, or None when not needed and stored apart; test set)
DATASETS: dict[str, Callable[[DataConfig, bool], tuple[ImageSet | None, ImageSet]]] = {
    "digits": digits.load,
    "mnist": idx.loader("mnist"),
    "fashion-mnist": idx.loader("fashion-mnist"),
    "kmnist": idx.loader("kmnist"),
    "cifar10": cifar.loader("cifar10"),
    "cifar100": cifar.loader("cifar100"),
    "imagefolder": imagefolder.load,
    "filelist": filelist.load,
    "svhn": svhn.load,
    "mnist-scenes": scenes.load,
    "segfolder": segfolder.load,
    "coco": coco.load,
    "memory": _memory,
}


@dataclass
class DataInfo:
    name: str
    classes: list[str]
    input_shape: tuple[int, ...]  # one sample's: (C, H, W) for images, (D,) vectors, (C, L) sequences
    mean: list[float]
    std: list[float]
    shots: int | None = None  # images per class of the few-shot view (data.shots_per_class), if any
    #: what the labels are (kdkit.tasks): "classification" (a class per sample), "segmentation" (a label map)
    task: str = "classification"
    #: task: embedding: the embedding section (dim, head, metric...), set by the runner
    embedding: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def output_size(self) -> int:
        """The width of a model's output: the class count, or the embedding's width (task: embedding)."""
        return int(self.embedding["dim"]) if self.task == "embedding" and self.embedding else self.num_classes

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_size(self) -> int:
        """Images: the side of the (square) image; other samples: their second dimension, or 1 for vectors."""
        return self.input_shape[1] if len(self.input_shape) > 1 else 1

    @property
    def is_images(self) -> bool:
        return len(self.input_shape) == 3

    def to_dict(self) -> dict:
        out = {"name": self.name, "classes": self.classes, "input_shape": list(self.input_shape),
               "mean": self.mean, "std": self.std}
        if self.task != "classification":
            out["task"] = self.task
        if self.embedding:
            out["embedding"] = self.embedding
        return out


#: a split of a run: decoded in memory, streamed sample by sample, or the user's own loader
Split = Union[ImageSet, "SampleSet", "UserLoader"]


@dataclass
class DataBundle:
    info: DataInfo
    train: Split | None  # None for data-free runs: the training images are never read
    val: Split | None
    test: Split
    fewshot: Split | None = None  # unlabeled: images only
    #: the whole labeled training set when ``data.train_subset`` keeps only part of it (else the same as train)
    train_full: Split | None = None
    #: how the data is held and why (memory or streaming), said in the run log and the summary
    notes: list[str] = field(default_factory=list)
    #: "memory" or "stream" (the user's own loaders count as streamed)
    path: str = "memory"

    def split(self, name: str) -> Split:
        sets = {"train": self.train, "val": self.val, "test": self.test, "fewshot": self.fewshot,
                "train_full": self.train_full if self.train_full is not None else self.train}
        if name not in sets:
            raise DataError(f"unknown data split {name!r}; splits: {', '.join(sets)}")
        s = sets[name]
        if s is None:
            if name == "train":
                raise DataError("this run reads no training images (a data-free method)")
            raise DataError(f"this run has no {name} split (see data.val_split / data.shots_per_class)")
        return s


def load_data(cfg: DataConfig, train_images: bool = True,
              stats: tuple[list[float], list[float]] | None = None) -> DataBundle:
    """Read dataset `cfg.name`, resize, compute normalisation, carve validation, subset, few-shot view.

    With ``train_images=False`` (data-free methods) the bundle has no training set: the training files are
    opened only when ``data.val_split`` asks for a validation set carved from them, and the training
    images themselves are dropped. ``stats`` (mean, std) then gives the normalisation the teacher was
    trained with, since there is no training set to compute it from.
    """
    train, test = DATASETS[cfg.name](cfg, train_images or cfg.val_split > 0)
    train, test, notes, path = hold(cfg, train, test)
    unseen = None
    if cfg.pairs:  # the listed pairs are the test split; their identities stay out of training
        from .files import require_root
        from .pairs import pairs_set

        if not isinstance(train, ImageSet):
            raise DataError("data.pairs: the training identities must be held in memory: set data.in_memory=true")
        test, names = pairs_set(cfg, require_root(cfg.root, cfg.name, "identity folders"), train.classes)
        unseen = sorted(set(cfg.unseen_classes) | {train.classes.index(n) for n in names if n in train.classes})
    bundle = make_bundle(cfg, train, test, train_images, stats, unseen=unseen)
    bundle.notes, bundle.path = notes + bundle.notes, path
    return bundle


def hold(cfg: DataConfig, train: Split | None, test: Split) -> tuple[Split | None, Split, list[str], str]:
    """Decide, for sets a reader lists without decoding (image files), whether to decode them into memory
    or stream them (``data.in_memory``); sets a reader holds in memory already are streamed only when asked."""
    from .stream import SampleSet, TensorSampleSet

    sets = [x for x in (train, test) if x is not None]
    if all(isinstance(x, ImageSet) for x in sets):
        if cfg.in_memory is False:
            return (None if train is None else TensorSampleSet(train), TensorSampleSet(test),  # type: ignore[arg-type]
                    ["streaming the data through DataLoader workers (data.in_memory=false)"], "stream")
        return train, test, [], "memory"
    size_mb = sum(x.decoded_bytes() for x in sets if isinstance(x, SampleSet)) / 2**20
    limit = cfg.memory_limit_mb
    if cfg.in_memory is True or (cfg.in_memory == "auto" and size_mb <= limit):
        why = "data.in_memory=true" if cfg.in_memory is True else f"data.in_memory=auto, {size_mb:.0f} MB <= " \
              f"data.memory_limit_mb {limit:.0f} MB"
        held = [x.to_memory() if isinstance(x, SampleSet) else x for x in (train, test)]
        return held[0], held[1], [f"decoded the data into memory ({why})"], "memory"  # type: ignore[return-value]
    why = "data.in_memory=false" if cfg.in_memory is False else f"data.in_memory=auto, {size_mb:.0f} MB decoded > " \
          f"data.memory_limit_mb {limit:.0f} MB"
    return train, test, [f"streaming the data from disk, decoded per sample in {workers_for(cfg)} worker process(es) "
                         f"({why})"], "stream"


def workers_for(cfg: DataConfig) -> int:
    """data.workers, with 'auto' as one per core but one, at most 8."""
    import os

    if cfg.workers == "auto":
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    return int(cfg.workers)


def make_bundle(cfg: DataConfig, train: Split | None, test: Split, train_images: bool = True,
                stats: tuple[list[float], list[float]] | None = None, val: Split | None = None,
                unseen: list[int] | None = None) -> DataBundle:
    """The bundle of already-read sets (see :func:`load_data`); a given `val` replaces the carved one; `unseen`
    (default ``data.unseen_classes``) the classes kept out of training."""
    unseen = cfg.unseen_classes if unseen is None else unseen
    from .stream import SampleSet, sample_stats
    from .user_loader import UserLoader

    if cfg.image_size:
        test = _resized(test, cfg.image_size)
        train = None if train is None else _resized(train, cfg.image_size)
        val = None if val is None else _resized(val, cfg.image_size)
    if train is not None and train.shape != test.shape:
        raise DataError(f"{cfg.name}: training samples are {train.shape} but test samples {test.shape}; "
                        "set data.image_size")
    if not cfg.normalize:
        c = test.shape[0]
        mean, std = [0.0] * c, [1.0] * c
    elif stats is not None:
        mean, std = list(stats[0]), list(stats[1])
    else:
        source = train if train is not None else test
        if isinstance(source, ImageSet):
            mean, std = channel_stats(source.images)
        elif isinstance(source, SampleSet):
            mean, std = sample_stats(source, seed=cfg.split_seed, skip_bad=cfg.on_bad_file == "skip")
        else:
            raise DataError("a loader of uint8 images needs its normalisation: set data.normalize=false to feed the "
                            "images as given, or pass float images")
    info = DataInfo(cfg.name, list(test.classes), tuple(test.shape), mean, std, cfg.shots_per_class,
                    labels_task(test))
    if info.task != "classification" and (cfg.train_subset or cfg.shots_per_class):
        raise DataError(f"data.train_subset and data.shots_per_class pick images per class; {cfg.name} is labelled "
                        f"per pixel ({info.task}): remove them")
    if isinstance(train, UserLoader):
        if val is None and cfg.val_split > 0:
            cfg.val_split = 0.0
            note = ("no validation split: train_data is a loader kdkit iterates as it is and does not split; pass "
                    "val_data, or data.in_memory=true to collect it and carve one")
            return DataBundle(info, train if train_images else None, None, test, notes=[note], path="stream")
        return DataBundle(info, train if train_images else None, val, test, path="stream")
    if unseen and train is not None:
        train, val, test, info.classes = open_set(cfg, train, test, val, unseen)
    elif val is None and cfg.val_split > 0:
        assert train is not None and train.labels is not None
        keep, held = stratified_split(train.labels, cfg.val_split, cfg.split_seed)
        train, val = train.subset(keep), train.subset(held)
    if not train_images:
        return DataBundle(info, None, val, test)
    assert train is not None
    fewshot = None
    if cfg.shots_per_class and train.labels is None:  # unlabeled images from the Python API: they are the set
        fewshot = train
    elif cfg.shots_per_class:
        fewshot = train.subset(per_class(train.labels, cfg.shots_per_class, cfg.split_seed,
                                         "data.shots_per_class")).unlabeled()
    if cfg.train_subset and train.labels is None:
        raise DataError("data.train_subset picks images per class, and these training images have no labels")
    full = None
    if cfg.train_subset:
        full = train
        train = train.subset(per_class(train.labels, cfg.train_subset, cfg.split_seed, "data.train_subset"))
    return DataBundle(info, train, val, test, fewshot, full)


def open_set(cfg: DataConfig, train: Split, test: Split, val: Split | None, unseen_classes: list[int]
             ) -> tuple[ImageSet, ImageSet | None, ImageSet, list[str]]:
    """The open-set split of ``data.unseen_classes``: training on the other classes (relabelled 0..K-1 in their
    order), validation on ``data.val_split`` of the unseen classes' training images, test on their test images
    (their labels kept: verification only asks which images share an identity)."""
    if not all(isinstance(x, ImageSet) for x in (train, test)) or train.labels is None or test.labels is None:
        raise DataError("data.unseen_classes splits labeled data held in memory: set data.in_memory=true")
    if val is not None:
        raise DataError("data.unseen_classes carves the validation split from the unseen classes; do not give one")
    known = set(range(len(train.classes))) if train.classes else set(train.labels.unique().tolist())
    unseen = sorted(set(unseen_classes))
    missing = [c for c in unseen if c not in known]
    if missing or len(unseen) >= len(known):
        raise DataError(f"data.unseen_classes={unseen}: classes are 0..{len(known) - 1}"
                        + (f"; {missing} are not among them" if missing else "; keep at least one class for training"))
    seen = [c for c in sorted(known) if c not in unseen]
    remap = torch.full((max(known) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(seen)] = torch.arange(len(seen))
    is_seen = remap[train.labels] >= 0
    tr = ImageSet(train.images[is_seen], remap[train.labels[is_seen]], [train.classes[c] for c in seen]
                  if train.classes else [str(c) for c in seen])
    held = torch.nonzero(~is_seen).flatten()
    val_set = None
    if cfg.val_split > 0 and len(held):
        n = round(len(held) * cfg.val_split) if cfg.val_split < 1 else min(len(held), int(cfg.val_split))
        pick = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(cfg.split_seed))[:n]]
        val_set = train.subset(pick.sort().values)
    te = test if test.pairs is not None else test.subset(torch.nonzero(torch.isin(test.labels,
                                                                               torch.tensor(unseen))).flatten())
    if len(te) < 2:
        raise DataError(f"data.unseen_classes={unseen}: the test split holds {len(te)} image(s) of those classes; "
                        "verification needs pairs")
    return tr, val_set, te, tr.classes


def labels_task(data: Split) -> str:
    """The task a split's labels are for: "segmentation" for label maps, else "classification"."""
    if isinstance(data, ImageSet):
        return target_task(data.labels)
    return getattr(data, "task", "classification")


def target_task(labels: torch.Tensor | None) -> str:
    """The task of labels: boxes ``[N, M, 5]`` (float: x1, y1, x2, y2 as fractions of the image's width and
    height, class; rows of -1 pad) are detection, integer label
    maps ``[N, H, W]`` segmentation, class indices ``[N]`` classification."""
    if labels is not None and labels.dim() == 3:
        return "detection" if labels.is_floating_point() else "segmentation"
    return "classification"


def _resized(data: Split, size: int) -> Split:
    if isinstance(data, ImageSet):
        labels = data.labels
        # label maps are resized by nearest neighbour; boxes are fractions of the image and need nothing
        if target_task(labels) == "segmentation" and labels.shape[-2:] != (size, size):
            labels = torch.nn.functional.interpolate(labels[:, None].float(), size=(size, size),
                                                     mode="nearest")[:, 0].to(labels.dtype)
        return ImageSet(resize(data.images, size), labels, data.classes)
    return data  # image files are resized when decoded; a user's loader is used as it is


def make_loader(data: Split, batch_size: int, cfg: DataConfig, *, train: bool, info: DataInfo, seed: int = 0,
                device: torch.device | str = "cpu", rank: int = 0, world: int = 1, channels_last: bool = False,
                drop_last: bool | None = None, workers: int | None = None) -> Any:
    """The batch loader of a split, for training (shuffled, augmented, last partial batch dropped unless
    `drop_last` says otherwise) or evaluation: in memory, streamed, or the user's own loader. `workers`
    overrides ``data.workers`` for a streamed split (0 for a one-batch look: worker processes started for one
    batch and dropped cost seconds to shut down)."""
    from .stream import SampleSet, StreamLoader
    from .user_loader import UserBatchLoader, UserLoader

    drop = train if drop_last is None else (train and drop_last)
    common = {"mean": info.mean, "std": info.std, "device": device, "channels_last": channels_last}
    if isinstance(data, UserLoader):
        return UserBatchLoader(data, **common)
    if isinstance(data, SampleSet):
        return StreamLoader(data, batch_size, shuffle=train, drop_last=drop, seed=seed, rank=rank, world=world,
                            augment=sample_augment_from(cfg) if train else None,
                            workers=workers_for(cfg) if workers is None else workers,
                            skip_bad=cfg.on_bad_file == "skip", **common)
    augment = augment_from(cfg) if train else None
    if augment is not None and augment.active and data.images.dim() != 4:
        raise DataError(f"data.augment crops and flips images [C, H, W]; these samples are {data.shape}: turn "
                        "data.augment off")
    return BatchLoader(data, batch_size, shuffle=train, drop_last=drop, augment=augment, seed=seed, rank=rank,
                       world=world, **common)


def sample_augment_from(cfg: DataConfig) -> Any:
    from .natural import SampleAugment

    a = cfg.augment
    if a.random_resized_crop and not cfg.image_size:
        raise DataError("data.augment.random_resized_crop resizes its crops to data.image_size: set it")
    return SampleAugment(a.random_resized_crop, a.hflip, a.color_jitter, a.crop_padding)


def augment_from(cfg: DataConfig) -> Augment:
    return Augment(cfg.augment.crop_padding, cfg.augment.hflip)


__all__ = [
    "DATASETS", "Augment", "Batch", "BatchLoader", "DataBundle", "DataInfo", "ImageSet", "Split", "augment_from",
    "load_data", "make_bundle", "make_loader", "per_class", "stratified_split",
]
