"""Tensor augmentations applied to whole batches (no per-image Python loop, no torchvision).

Random draws are made for the *global* batch from a generator seeded by (seed, epoch, step), and each
process takes its slice: the augmented global batch is the same for any number of processes, and a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Augment:
    crop_padding: int = 0
    hflip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def sample(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Random parameters for `n` images."""
        p: dict[str, torch.Tensor] = {}
        if self.crop_padding > 0:
            p["crop"] = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=gen)
        if self.hflip:
            p["flip"] = torch.rand(n, generator=gen) < 0.5
        return p

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], fill: float = 0) -> torch.Tensor:
        """Augment images ``x [B, C, H, W]`` with the given per-image parameters (padding with `fill`)."""
        if "crop" in params:
            x = random_crop(x, self.crop_padding, params["crop"].to(x.device), fill)
        if "flip" in params:
            flip = params["flip"].to(x.device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        return x

    def apply_maps(self, y: torch.Tensor, params: dict[str, torch.Tensor], fill: int = 255) -> torch.Tensor:
        """The same crops and flips on label maps ``y [B, H, W]``; pixels padded in are `fill` (ignored)."""
        return self.apply(y.unsqueeze(1), params, fill).squeeze(1)

    def apply_boxes(self, boxes: torch.Tensor, params: dict[str, torch.Tensor], height: int,
                    width: int) -> torch.Tensor:
        """The same crops and flips on boxes ``[B, M, 5]`` (x1, y1, x2, y2 as fractions of the image's width and
        height, class; rows of -1 are padding): a crop shifts them and clips them to the image (a box left with
        no area becomes padding), a flip mirrors x."""
        b = boxes.clone()
        real = b[..., 4] >= 0
        if "crop" in params:
            off = params["crop"].to(b.device).float()  # (dy, dx) in pixels
            shift = (self.crop_padding - off)[:, None, :]  # [B, 1, 2]
            b[..., 0:4:2] = (b[..., 0:4:2] + shift[..., 1:2] / width).clamp(0, 1)
            b[..., 1:4:2] = (b[..., 1:4:2] + shift[..., 0:1] / height).clamp(0, 1)
        if "flip" in params:
            flip = params["flip"].to(b.device).view(-1, 1)
            x1, x2 = b[..., 0].clone(), b[..., 2].clone()
            b[..., 0] = torch.where(flip, 1 - x2, x1)
            b[..., 2] = torch.where(flip, 1 - x1, x2)
        keep = real & (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])
        return torch.where(keep[..., None], b, torch.full_like(b, -1.0))


def random_crop(x: torch.Tensor, padding: int, offsets: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """Pad by `padding` with `fill` and crop back to the input size at per-image ``offsets [B, 2]`` (dy, dx)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding), value=fill)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # [B, W]
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel values `t` shaped to broadcast over dimension 1 of `x`."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel: dimension 1 of a batch of images, sequences or vectors."""
    return (x - _per_channel(mean, x)) / _per_channel(std, x)


def normalize_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """:func:`normalize` in place on a float `x` (no new tensor)."""
    return x.sub_(_per_channel(mean, x)).div_(_per_channel(std, x))
