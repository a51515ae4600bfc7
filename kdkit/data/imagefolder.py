"""Images in class sub-folders: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val``), ImageNet's
layout, or a flat ``root/<class>/*`` from which a seeded, stratified test split is carved.

Listing the folders reads no image: the files become a :class:`~kdkit.data.stream.FileSampleSet` whose labels
are the folder names, decoded by Pillow when read. ``data.in_memory`` then decides whether the set is
decoded once into memory (small sets) or streamed from disk (see :func:`kdkit.data.load_data`). Images are
converted to grayscale or RGB (``data.channels``, default from the first image) and, with
``data.image_size``, resized (shorter side) and centre-cropped to that square; without it every image must
share one size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import DataConfig
from ..errors import DataError
from .files import require_root
from .pathtable import PathTable
from .splits import stratified_split
from .stream import FileSampleSet

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


def _classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_mode(path: Path, channels: int | None) -> str:
    """'L' or 'RGB': from data.channels, else from the first image."""
    if channels is not None:
        mode = {1: "L", 3: "RGB"}.get(channels)
        if mode is None:
            raise DataError(f"data.channels must be 1 or 3 for image files, got {channels}")
        return mode
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return "L" if im.mode in ("1", "L", "I;16", "I", "LA") else "RGB"
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e}); remove or replace it") from None


def _listing(folder: Path, classes: list[str]) -> tuple[PathTable, list[int]]:
    labels: list[int] = []

    def files() -> Iterator[str]:  # one class folder's names at a time, never an object per image of the set
        for label, cls in enumerate(classes):
            d = folder / cls
            names = sorted(e.path for e in os.scandir(d) if os.path.splitext(e.name)[1].lower() in EXTENSIONS
                           and e.is_file()) if d.is_dir() else []
            labels.extend([label] * len(names))
            yield from names

    paths = PathTable(files())
    if not len(paths):
        raise DataError(f"{folder}: no images ({', '.join(sorted(EXTENSIONS))}) in its class sub-folders")
    return paths, labels


def _set(folder: Path, classes: list[str], cfg: DataConfig, mode: str | None) -> tuple[FileSampleSet, str]:
    paths, labels = _listing(folder, classes)
    mode = mode or image_mode(paths[0], cfg.channels)
    return FileSampleSet(paths, torch.tensor(labels, dtype=torch.long), classes, mode, cfg.image_size,
                         cfg.eval_crop), mode


def load(cfg: DataConfig, need_train: bool = True) -> tuple[FileSampleSet | None, FileSampleSet]:
    root = require_root(cfg.root, "imagefolder", "class sub-folders of images (train/<class>/, test/<class>/)")
    if cfg.channels is not None and cfg.channels not in (1, 3):
        raise DataError(f"data.channels must be 1 or 3 for imagefolder, got {cfg.channels}")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = _classes(root / "train")
        if not classes:
            raise DataError(f"{root / 'train'} has no class sub-folders; expected train/<class>/<image files>")
        extra = sorted(set(_classes(test_dir)) - set(classes))
        if extra:
            raise DataError(f"{test_dir} has classes not in {root / 'train'}: {', '.join(extra)}")
        if not need_train:
            return None, _set(test_dir, classes, cfg, None)[0]
        train, mode = _set(root / "train", classes, cfg, None)
        test, _ = _set(test_dir, classes, cfg, mode)
        return train, test
    classes = _classes(root)
    if not classes:
        raise DataError(f"{root}: no class sub-folders; expected <class>/<images> or train/<class>/ and test/<class>/")
    full, _ = _set(root, classes, cfg, None)
    assert full.labels is not None
    keep, held = stratified_split(full.labels, cfg.test_split, cfg.split_seed)
    return full.subset(keep), full.subset(held)  # type: ignore[return-value]
