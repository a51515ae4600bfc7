"""Images in class sub-folders: ``root/train/<class>/*.png`` and ``root/test/<class>/*`` (or ``val``),
or a flat ``root/<class>/*`` from which a seeded, stratified test split is carved.

Images are decoded once with Pillow into memory, converted to grayscale or RGB (``data.channels``,
default from the first image) and, if ``data.image_size`` is set, resized to that square size.
Without ``image_size`` all images must share one size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .files import require_root
from .images import ImageSet
from .splits import stratified_split

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


def _classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read(folder: Path, classes: list[str], cfg: DataConfig, mode: str | None) -> tuple[ImageSet, str]:
    from PIL import Image, UnidentifiedImageError

    arrays, labels = [], []
    size: tuple[int, int] | None = None
    for label, cls in enumerate(classes):
        d = folder / cls
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in EXTENSIONS) if d.is_dir() else []
        for f in files:
            try:
                with Image.open(f) as im:
                    if mode is None:
                        mode = "L" if im.mode in ("1", "L", "I;16", "I", "LA") else "RGB"
                    im = im.convert(mode)
                    if cfg.image_size:
                        im = im.resize((cfg.image_size, cfg.image_size), Image.Resampling.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise DataError(f"{f}: not a readable image ({e}); remove or replace it") from None
            if size is None:
                size = a.shape[:2]
            elif a.shape[:2] != size:
                raise DataError(
                    f"{f} is {a.shape[1]}x{a.shape[0]} but earlier images are {size[1]}x{size[0]}; "
                    "set data.image_size to resize all images to one size"
                )
            arrays.append(a if a.ndim == 3 else a[:, :, None])
            labels.append(label)
    if not arrays:
        raise DataError(f"{folder}: no images ({', '.join(sorted(EXTENSIONS))}) in its class sub-folders")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(x, torch.tensor(labels, dtype=torch.long), classes), mode or "RGB"


def load(cfg: DataConfig, need_train: bool = True) -> tuple[ImageSet | None, ImageSet]:
    root = require_root(cfg.root, "imagefolder", "class sub-folders of images (train/<class>/, test/<class>/)")
    mode = None if cfg.channels is None else {1: "L", 3: "RGB"}.get(cfg.channels)
    if cfg.channels is not None and mode is None:
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
            return None, _read(test_dir, classes, cfg, mode)[0]
        train, mode = _read(root / "train", classes, cfg, mode)
        test, _ = _read(test_dir, classes, cfg, mode)
        return train, test
    classes = _classes(root)
    if not classes:
        raise DataError(f"{root}: no class sub-folders; expected <class>/<images> or train/<class>/ and test/<class>/")
    full, _ = _read(root, classes, cfg, mode)
    keep, held = stratified_split(full.labels, cfg.test_split, cfg.split_seed)
    return full.subset(keep), full.subset(held)
