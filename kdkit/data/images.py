"""In-memory image sets: uint8 tensors ``[N, C, H, W]`` (pixels 0..255) with int64 labels.

Images a user hands to the Python API as float tensors are kept as float32 and used as given (no division
by 255): :attr:`ImageSet.scale` is 255 for uint8 images and 1 for float ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ImageSet:
    """Images as uint8 (or float32) ``[N, C, H, W]``; ``labels`` is None for an unlabeled view."""

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype not in (torch.uint8, torch.float32) or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 or float32 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def scale(self) -> float:
        """What the stored values are divided by to give the model's input scale (255 for uint8 pixels)."""
        return 255.0 if self.images.dtype == torch.uint8 else 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], None if self.labels is None else self.labels[index], self.classes)

    def unlabeled(self) -> ImageSet:
        """The same images with no labels at all: methods given this view cannot read labels."""
        return ImageSet(self.images, None, self.classes)


def resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize images to ``size x size`` (bilinear with antialiasing; uint8 stays uint8), in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    out = []
    for part in images.split(chunk):
        f = F.interpolate(part.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(f.round_().clamp_(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else f)
    return torch.cat(out)


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale (float images: as they are)."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    for part in images.split(chunk):
        f = part.to(torch.float64) / (255.0 if images.dtype == torch.uint8 else 1.0)
        s += f.sum(dim=(0, 2, 3))
        s2 += (f * f).sum(dim=(0, 2, 3))
        n += f.numel() // c
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]
