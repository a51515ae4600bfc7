"""``segfolder``: images and label-map PNGs in parallel folders, the VOC / Cityscapes way.

Layout under ``data.root``::

    train/images/<stem>.png|jpg|...    train/masks/<stem>.png
    test/images/<stem>.png|jpg|...     test/masks/<stem>.png
    classes.txt                        (optional: one class name per line, in label order)

A mask is a single-channel PNG (grayscale or palette, as VOC's ``SegmentationClass``) of the image's size
whose pixel values are class indices; ``data.ignore_index`` (255 by default) marks pixels that count nowhere
(kdkit stores them as 255). Without ``classes.txt`` the classes are 0..max, the largest label found in the
training masks. ``data.image_size`` resizes images (bilinear) and masks (nearest) to a square.

Small sets are decoded into memory; large ones are streamed (``data.in_memory``, as for image folders). Every
problem names its file: an image without a mask, a mask of another size than its image, a value at or above
the class count; in memory they are found before training, streamed when the file is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..errors import DataError
from .files import require_root
from .imagefolder import EXTENSIONS, image_mode
from .natural import SampleAugment, augment_with_target, read_image, resize_square
from .pathtable import PathTable
from .stream import SampleSet

IGNORE = 255


def read_mask(path: Path, ignore_index: int = IGNORE) -> torch.Tensor:
    """A label-map PNG as uint8 ``[H, W]`` (palette indices, or gray values), `ignore_index` stored as 255."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise DataError(f"{path}: a {im.mode} image, but a mask is a single-channel label map (grayscale "
                                "or palette PNG whose values are class indices)")
            a = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable mask ({str(e).splitlines()[0][:160]}); replace it") from None
    if a.size and int(a.max()) > 255 and ignore_index == IGNORE:
        raise DataError(f"{path}: label {int(a.max())} does not fit a class index 0..254; fix the mask")
    m = torch.from_numpy(a.astype(np.int64))
    if ignore_index != IGNORE:
        m = torch.where(m == ignore_index, torch.full_like(m, IGNORE), m)
    return m.clamp(0, 255).to(torch.uint8)


def _pairs(folder: Path) -> tuple[list[Path], list[Path]]:
    images_dir, masks_dir = folder / "images", folder / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"segfolder: {d} is not a folder; put the images in {images_dir} and their label-map "
                            f"PNGs (same file names) in {masks_dir}")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not images:
        raise DataError(f"segfolder: no images ({', '.join(sorted(EXTENSIONS))}) in {images_dir}")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() == ".png"}
    missing = [p for p in images if p.stem not in masks]
    if missing:
        raise DataError(f"segfolder: {missing[0]} has no mask {masks_dir / (missing[0].stem + '.png')}"
                        + (f" (nor do {len(missing) - 1} other images)" if len(missing) > 1 else "")
                        + "; add the masks or remove the images")
    return images, [masks[p.stem] for p in images]


class SegFolderSet(SampleSet):
    """Image files with their label maps, decoded (and checked) when read.

    ``labels`` is a per-image placeholder ``[N, 1, 1]``: it marks the set as labelled (per pixel) and lets the
    seeded validation split work as for other sets; the label maps themselves are decoded with their images."""

    def __init__(self, images: list[Path], masks: list[Path], classes: list[str], mode: str, size: int | None,
                 ignore_index: int):
        self.images, self.masks, self.classes = PathTable(images), PathTable(masks), classes
        self.mode, self.size, self.ignore_index = mode, size, ignore_index
        self.labels = torch.zeros(len(images), 1, 1, dtype=torch.uint8)
        self.scale = 255.0

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return str(self.images[i])

    def load(self, i: int, augment: SampleAugment | None,
             g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = read_image(self.images[i], self.mode)
        y = read_mask(self.masks[i], self.ignore_index)
        if tuple(y.shape) != tuple(x.shape[1:]):
            raise DataError(f"{self.masks[i]} is {y.shape[1]}x{y.shape[0]} but its image {self.images[i]} is "
                            f"{x.shape[2]}x{x.shape[1]}; a mask labels its image pixel for pixel")
        k = len(self.classes)
        bad = (y != IGNORE) & (y >= k)
        if bool(bad.any()):
            raise DataError(f"{self.masks[i]}: label {int(y[bad].max())}, but there are {k} classes (0..{k - 1}, "
                            f"{IGNORE} ignored); fix the mask or list every class in classes.txt")
        if self.size is not None:
            x = resize_square(x, self.size)
            y = F.interpolate(y[None, None].float(), size=(self.size, self.size), mode="nearest")[0, 0].to(torch.uint8)
        if augment is not None and g is not None:
            x, y = augment_with_target(x, y, augment, g)
        return x, y


def _classes(root: Path, masks: list[Path], ignore_index: int) -> list[str]:
    listed = root / "classes.txt"
    if listed.is_file():
        names = [line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise DataError(f"{listed} is empty; give one class name per line, or remove it")
        return names
    top = -1
    for m in masks:
        y = read_mask(m, ignore_index)
        valid = y[y != IGNORE]
        if valid.numel():
            top = max(top, int(valid.max()))
    if top < 0:
        raise DataError(f"segfolder: every pixel of the training masks under {root} is ignored ({IGNORE}); nothing "
                        "to learn from")
    return [str(i) for i in range(top + 1)]


def load(cfg: DataConfig, need_train: bool = True) -> tuple[SegFolderSet | None, SegFolderSet]:
    root = require_root(cfg.root, "segfolder", "train/ and test/ folders, each with images/ and masks/")
    tr_images, tr_masks = _pairs(root / "train")
    te_images, te_masks = _pairs(root / "test")
    classes = _classes(root, tr_masks, cfg.ignore_index)
    if len(classes) > 255:
        raise DataError(f"segfolder: {len(classes)} classes, but label maps hold 0..254 ({IGNORE} is ignored)")
    mode = image_mode(tr_images[0], cfg.channels)
    train = SegFolderSet(tr_images, tr_masks, classes, mode, cfg.image_size, cfg.ignore_index)
    test = SegFolderSet(te_images, te_masks, classes, mode, cfg.image_size, cfg.ignore_index)
    return (train if need_train else None), test
