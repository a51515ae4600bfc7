"""Datasets by name, splits, few-shot views, tensor augmentations and the in-memory batch loader.

``load_data(cfg.data)`` returns a :class:`DataBundle`: the training set (after the validation split and
``train_subset``), the validation and test sets, an unlabeled few-shot view when
``shots_per_class`` is set, the whole labeled training set (split ``train_full``, for a stage that
trains a teacher on everything, e.g. SH-KD's), and :class:`DataInfo` (classes, input shape,
normalisation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import DataConfig
from ..errors import DataError
from . import cifar, digits, idx, imagefolder, svhn
from .augment import Augment
from .images import ImageSet, channel_stats, resize
from .loader import Batch, BatchLoader
from .splits import per_class, stratified_split


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
    "svhn": svhn.load,
    "memory": _memory,
}


@dataclass
class DataInfo:
    name: str
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    shots: int | None = None  # images per class of the few-shot view (data.shots_per_class), if any

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_size(self) -> int:
        return self.input_shape[1]

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": self.classes, "input_shape": list(self.input_shape),
                "mean": self.mean, "std": self.std}


@dataclass
class DataBundle:
    info: DataInfo
    train: ImageSet | None  # None for data-free runs: the training images are never read
    val: ImageSet | None
    test: ImageSet
    fewshot: ImageSet | None = None  # unlabeled: images only
    #: the whole labeled training set when ``data.train_subset`` keeps only part of it (else the same as train)
    train_full: ImageSet | None = None

    def split(self, name: str) -> ImageSet:
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
    return make_bundle(cfg, train, test, train_images, stats)


def make_bundle(cfg: DataConfig, train: ImageSet | None, test: ImageSet, train_images: bool = True,
                stats: tuple[list[float], list[float]] | None = None, val: ImageSet | None = None) -> DataBundle:
    """The bundle of already-read image sets (see :func:`load_data`); a given `val` replaces the carved one."""
    if cfg.image_size:
        test = ImageSet(resize(test.images, cfg.image_size), test.labels, test.classes)
        if train is not None:
            train = ImageSet(resize(train.images, cfg.image_size), train.labels, train.classes)
        if val is not None:
            val = ImageSet(resize(val.images, cfg.image_size), val.labels, val.classes)
    if train is not None and train.shape != test.shape:
        raise DataError(f"{cfg.name}: training images are {train.shape} but test images {test.shape}; "
                        "set data.image_size")
    if not cfg.normalize:
        mean, std = [0.0] * test.shape[0], [1.0] * test.shape[0]
    elif stats is not None:
        mean, std = list(stats[0]), list(stats[1])
    else:
        mean, std = channel_stats((train if train is not None else test).images)
    info = DataInfo(cfg.name, list(test.classes), test.shape, mean, std, cfg.shots_per_class)
    if val is None and cfg.val_split > 0:
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


def augment_from(cfg: DataConfig) -> Augment:
    return Augment(cfg.augment.crop_padding, cfg.augment.hflip)


__all__ = [
    "DATASETS", "Augment", "Batch", "BatchLoader", "DataBundle", "DataInfo", "ImageSet", "augment_from",
    "load_data", "make_bundle", "per_class", "stratified_split",
]
