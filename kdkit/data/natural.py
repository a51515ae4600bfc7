"""Decoding and per-sample augmentation of natural images with Pillow and torch (no torchvision).

Every random draw comes from a ``torch.Generator`` the caller seeds per sample (kdkit seeds it from the run's
seed, the epoch and the sample's index), so a sample's augmentation is the same whichever worker process
decodes it, and a resumed run draws what an uninterrupted one would.

* training: ``RandomResizedCrop`` (area 8-100% of the image, aspect ratio 3/4-4/3, then resized to
  ``image_size``), horizontal flip, colour jitter (brightness, contrast, saturation, each by a factor drawn
  from [1 - s, 1 + s]), random crop with zero padding;
* evaluation (and training without augmentation): resize the shorter side to ``image_size / data.eval_crop``
  and take the centre ``image_size`` square (``eval_crop`` 1: the whole square of a square image; 0.875: the
  ImageNet convention, 256 -> 224), or keep the image as it is when no ``image_size`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SampleAugment:
    """Per-sample training augmentation (``data.augment``)."""

    random_resized_crop: bool = False
    hflip: bool = False
    color_jitter: float = 0.0
    crop_padding: int = 0

    @property
    def active(self) -> bool:
        return self.random_resized_crop or self.hflip or self.color_jitter > 0 or self.crop_padding > 0


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def open_image(path: Any, mode: str) -> Any:
    """The image at `path` decoded and converted to `mode` ('L' or 'RGB'); Pillow's errors propagate."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert(mode)


def read_image(path: Any, mode: str) -> torch.Tensor:
    """The image file at `path` as uint8 ``[C, H, W]`` in `mode`; a DataError naming the file if it cannot be read."""
    from ..errors import DataError

    try:
        return to_tensor(open_image(path, mode))
    except (OSError, ValueError, SyntaxError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"{path}: not a readable image ({first}); remove or replace it, or set "
                        "data.on_bad_file=skip") from None


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 image ``[C, H, W]`` resized to ``size x size`` (bilinear, antialiased)."""
    import torch.nn.functional as F

    y = F.interpolate(x[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y[0].round().clamp(0, 255).to(torch.uint8)


def center_resize(im: Any, size: int, crop: float = 1.0) -> Any:
    """Resize the shorter side to ``size / crop`` and crop the centre ``size x size``."""
    from PIL import Image

    w, h = im.size
    short = round(size / crop)
    scale = short / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def random_resized_crop(im: Any, size: int, g: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Any:
    """A random crop of 8-100% of the area with aspect ratio in [3/4, 4/3] (log-uniform), resized to
    ``size x size``; after 10 failed draws, the centre crop of the largest allowed aspect ratio."""
    from PIL import Image

    w, h = im.size
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_r))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            return im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    r = w / h
    cw, ch = (w, round(w / ratio[1])) if r > ratio[1] else (round(h * ratio[0]), h) if r < ratio[0] else (w, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))


def to_tensor(im: Any) -> torch.Tensor:
    """A Pillow image as uint8 ``[C, H, W]``."""
    a = np.array(im, dtype=np.uint8)  # a writable copy (Pillow's buffer is read-only)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation of a uint8 ``[C, H, W]`` image, each scaled by a factor drawn from
    [1 - strength, 1 + strength] (saturation only for 3 channels), in a random order."""
    f = x.float()
    ops = ["brightness", "contrast", "saturation"] if x.shape[0] == 3 else ["brightness", "contrast"]
    order = torch.randperm(len(ops), generator=g).tolist()
    for k in order:
        a = _uniform(g, max(0.0, 1 - strength), 1 + strength)
        op = ops[k]
        if op == "brightness":
            f = f * a
        else:
            gray = f.mean(dim=0, keepdim=True) if x.shape[0] == 1 else (
                0.299 * f[0:1] + 0.587 * f[1:2] + 0.114 * f[2:3])
            ref = gray.mean() if op == "contrast" else gray
            f = ref + a * (f - ref)
    return f.round_().clamp_(0, 255).to(torch.uint8)


def pad_crop(x: torch.Tensor, padding: int, g: torch.Generator, offsets: bool = False) -> Any:
    """Zero-pad a ``[C, H, W]`` sample by `padding` and crop back to its size at a random offset (with `offsets`,
    also return the offset ``(dy, dx)`` as a tensor)."""
    _, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    off = torch.randint(0, 2 * padding + 1, (2,), generator=g)
    dy, dx = (int(v) for v in off)
    out = xp[:, dy:dy + h, dx:dx + w].contiguous()
    return (out, off) if offsets else out


def augment_with_target(x: torch.Tensor, y: torch.Tensor, aug: SampleAugment,
                        g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip, colour jitter and pad-crop of one image ``[C, H, W]`` with its target, moved the same way: a label map
    ``[H, W]`` (integer; pixels padded in are 255, ignored) or boxes ``[M, 5]`` (float fractions; a box cropped
    out becomes padding). The draws are those of :func:`augment_sample`: flip, jitter, then crop offsets."""
    from ..errors import DataError
    from .augment import Augment

    boxes = y.is_floating_point()
    if aug.random_resized_crop:
        raise DataError("data.augment.random_resized_crop is not available with boxes; use crop_padding and hflip for "
                        "detection" if boxes else "data.augment.random_resized_crop is not available for label maps; "
                        "use crop_padding and hflip for segmentation")
    moves: list[dict[str, torch.Tensor]] = []  # applied to the target in the image's order: flip, then crop
    if aug.hflip and float(torch.rand((), generator=g)) < 0.5:
        x = x.flip(2)
        moves.append({"flip": torch.tensor([True])})
    if aug.color_jitter > 0 and x.dtype == torch.uint8:
        x = color_jitter(x, aug.color_jitter, g)
    if aug.crop_padding > 0:
        x, offsets = pad_crop(x, aug.crop_padding, g, offsets=True)
        moves.append({"crop": offsets[None]})
    move = Augment(aug.crop_padding, aug.hflip)
    _, h, w = x.shape
    for params in moves:
        y = move.apply_boxes(y[None], params, h, w)[0] if boxes else move.apply_maps(y[None], params)[0]
    return x, y


def augment_sample(x: torch.Tensor, aug: SampleAugment, g: torch.Generator) -> torch.Tensor:
    """Flip, jitter and pad-crop of one decoded ``[C, H, W]`` sample (the crop-and-resize is done on the
    Pillow image, see :func:`image_sample`)."""
    if aug.hflip and float(torch.rand((), generator=g)) < 0.5:
        x = x.flip(2)
    if aug.color_jitter > 0 and x.dtype == torch.uint8:
        x = color_jitter(x, aug.color_jitter, g)
    if aug.crop_padding > 0:
        x = pad_crop(x, aug.crop_padding, g)
    return x


def image_sample(path: Any, mode: str, size: int | None, aug: SampleAugment | None,
                 g: torch.Generator | None, crop: float = 1.0) -> torch.Tensor:
    """One image file as uint8 ``[C, H, W]``: augmented for training when `aug` is given, else resized and
    centre-cropped (or as it is, without `size`)."""
    im = open_image(path, mode)
    if aug is not None and aug.random_resized_crop:
        assert size is not None and g is not None
        im = random_resized_crop(im, size, g)
    elif size is not None:
        im = center_resize(im, size, crop)
    x = to_tensor(im)
    if aug is not None:
        assert g is not None
        x = augment_sample(x, aug, g)
    return x
