"""Adapters that map a student feature to the teacher's width, created from the observed shapes.

4-D features ``[B, C, H, W]`` get a 1x1 convolution (optionally followed by BatchNorm, the FitNets /
multi-path default); 2-D features ``[B, D]`` a linear map. Equal widths need no adapter unless one is
asked for. A spatial size mismatch is an error naming both layers and shapes (``spatial="same"``), or the
student map is resized bilinearly to the teacher's size (``"resize"``), or it is left alone (``"any"``,
for losses that pool over positions).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

AdapterKind = Literal["conv", "conv_bn", "linear", "identity", "auto"]
#: what an adapter does when the spatial sizes differ: fail, resize the student map, or ignore it (for
#: losses that pool or take Gram matrices and so do not compare positions)
Spatial = Literal["same", "resize", "any"]


class Pointwise(nn.Conv2d):
    """A 1x1 convolution: the weights, initialisation and results of ``nn.Conv2d(cin, cout, 1)``.

    On the CPU with few input channels it is computed as a matrix product over channels, which measured
    5-10x faster here than the convolution kernels (3 -> 6 channels at 14x14, batch 256: 0.5 ms against
    5.2 ms forward and backward); from 16 input channels on the convolution kernels are as fast or faster.
    """

    MATMUL_BELOW = 16

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.in_channels >= self.MATMUL_BELOW:
            return super().forward(x)
        y = torch.einsum("oc,bchw->bohw", self.weight.flatten(1), x)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def needs_resize(s_shape: torch.Size, t_shape: torch.Size, names: tuple[str, str], resize: bool) -> bool:
    """Whether a student map must be resized to the teacher's; an error if it must and `resize` is off."""
    if len(s_shape) != 4 or s_shape[2:] == t_shape[2:]:
        return False
    if not resize:
        raise ModelError(
            f"spatial size of student layer {names[0]!r} {tuple(s_shape)} differs from teacher layer "
            f"{names[1]!r} {tuple(t_shape)}; pick layers of equal resolution or set method.resize=true"
        )
    return True


class Adapter(nn.Module):
    """Student feature -> teacher feature shape."""

    def __init__(self, s_shape: torch.Size, t_shape: torch.Size, kind: AdapterKind = "auto",
                 spatial: Spatial = "same", names: tuple[str, str] = ("student", "teacher")):
        super().__init__()
        if len(s_shape) != len(t_shape) or len(s_shape) not in (2, 4):
            raise ModelError(
                f"cannot adapt student layer {names[0]!r} {tuple(s_shape)} to teacher layer {names[1]!r} "
                f"{tuple(t_shape)}: both must be [B, C, H, W] maps or [B, D] vectors; pair layers of the same kind"
            )
        self.resize_to: tuple[int, int] | None = None
        if spatial != "any" and needs_resize(s_shape, t_shape, names, spatial == "resize"):
            self.resize_to = (int(t_shape[2]), int(t_shape[3]))
        cs, ct = int(s_shape[1]), int(t_shape[1])
        if kind == "auto":
            kind = "identity" if cs == ct else ("conv_bn" if len(s_shape) == 4 else "linear")
        if kind == "identity":
            if cs != ct:
                raise ModelError(
                    f"adapter 'identity' cannot map {cs} student channels ({names[0]!r}) to {ct} ({names[1]!r})"
                )
            self.map: nn.Module = nn.Identity()
        elif len(s_shape) == 2:
            self.map = nn.Linear(cs, ct)
        elif kind == "conv":
            self.map = Pointwise(cs, ct)
        elif kind == "conv_bn":
            self.map = nn.Sequential(Pointwise(cs, ct, bias=False), nn.BatchNorm2d(ct))
        else:  # linear on a map
            raise ModelError(f"adapter {kind!r} does not apply to the 4-D feature of {names[0]!r}; use conv or conv_bn")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_to is not None:
            x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)
        return self.map(x)
