"""In-memory sample sets: uint8 tensors ``[N, C, H, W]`` (pixels 0..255) with int64 labels, or, for data that
is not images, any float32 ``[N, ...]``: vectors ``[N, D]`` (tabular data, embeddings), sequences
``[N, C, L]``.

Samples a user hands to the Python API as float tensors are kept as float32 and used as given (no division
by 255): :attr:`ImageSet.scale` is 255 for uint8 images and 1 for float ones. Normalisation statistics
are per channel (dimension 1) for images and sequences, per feature for vectors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ImageSet:
    """Samples as uint8 (or float32) ``[N, ...]`` (images ``[N, C, H, W]``); ``labels`` is None for an unlabeled
    view."""

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] = field(default_factory=list)
    #: verification pairs ``[P, 3]`` (i, j, same identity) to score instead of every pair (data.pairs)
    pairs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype not in (torch.uint8, torch.float32) or self.images.dim() < 2:
            raise ValueError(f"samples must be uint8 or float32 [N, ...] (images [N, C, H, W]), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def scale(self) -> float:
        """What the stored values are divided by to give the model's input scale (255 for uint8 pixels)."""
        return 255.0 if self.images.dtype == torch.uint8 else 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample: ``(C, H, W)`` for images."""
        return tuple(self.images.shape[1:])

    @property
    def is_images(self) -> bool:
        return self.images.dim() == 4

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], None if self.labels is None else self.labels[index], self.classes)

    def unlabeled(self) -> ImageSet:
        """The same images with no labels at all: methods given this view cannot read labels."""
        return ImageSet(self.images, None, self.classes)


def memory_bytes() -> int:
    """This machine's physical memory."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_fits(nbytes: float, what: str, fix: str) -> None:
    """Refuse, before allocating, what would take more than half of this machine's memory."""
    have = memory_bytes()
    if nbytes > have / 2:
        from ..errors import DataError

        raise DataError(f"{what} would take {nbytes / 2**30:,.1f} GB, more than half of this machine's "
                        f"{have / 2**30:,.1f} GB; {fix}")


def resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize images to ``size x size`` (bilinear with antialiasing; uint8 stays uint8), in chunks."""
    if images.dim() != 4:
        from ..errors import DataError

        raise DataError(f"data.image_size resizes images [N, C, H, W]; these samples are {tuple(images.shape[1:])}: "
                        "remove data.image_size")
    if images.shape[-2:] == (size, size):
        return images
    check_fits(len(images) * images.shape[1] * size * size * images.element_size(),
               f"resizing {len(images):,} images to data.image_size={size}", "choose a smaller data.image_size")
    out = []
    for part in images.split(chunk):
        f = F.interpolate(part.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(f.round_().clamp_(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else f)
    return torch.cat(out)


def channel_stats(images: torch.Tensor, chunk_values: int = 1 << 22) -> tuple[list[float], list[float]]:
    """Mean and std per channel (dimension 1; per feature for vectors ``[N, D]``) of uint8 samples on the
    [0, 1] scale (float samples: as they are). Samples are converted in chunks of about `chunk_values` values
    (32 MB of float64), whatever their size."""
    c = images.shape[1]
    chunk = max(1, chunk_values // max(1, images[0].numel())) if len(images) else 1
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    dims = (0, *range(2, images.dim()))
    for part in images.split(chunk):
        f = part.to(torch.float64) / (255.0 if images.dtype == torch.uint8 else 1.0)
        s += f.sum(dim=dims)
        s2 += (f * f).sum(dim=dims)
        n += f.numel() // c
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]
