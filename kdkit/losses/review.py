"""Knowledge review (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021).

The student's features of several stages are fused from the deepest to the shallowest by attention-based
fusion (ABF) before each is compared with the teacher's feature of the same level, so that a shallow student
stage is taught by the teacher's deeper knowledge too ("review"). Level by level, from the deepest (the
pooled feature, a 1x1 map) to the shallowest:

    x_i = BN(conv1x1(F_s,i))                                    (to a common width C_mid)
    x_i = a_0 * x_i + a_1 * up(x_(i+1)),  [a_0, a_1] = sigmoid(conv1x1([x_i, up(x_(i+1))]))   (all but the deepest)
    out_i = BN(conv3x3(resize(x_i)))                            (to the teacher's width and size at level i)

and the hierarchical context loss compares each out_i with the teacher's F_t,i at full resolution and after
average pooling to 4x4, 2x2 and 1x1 (levels the map is larger than), with halving weights (eq. 5-6):

    HCL(o, f) = ( MSE(o, f) + sum_(l < h) 2^-k MSE(pool_l(o), pool_l(f)) ) / (1 + sum_(l < h) 2^-k),  k = 1, 2, 3.

``up`` is nearest-neighbour upsampling, as in the authors' code (ReviewKD and mdistiller), whose layer names
(``conv1``, ``conv2``, ``att_conv``) and initialisation (Kaiming uniform with a = 1) :class:`ABF` keeps, so a
state dict of theirs loads into it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def hcl_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss summed over levels (each ``[B, C, H, W]``, the same shapes pairwise)."""
    total = student[0].new_zeros(())
    for fs, ft in zip(student, teacher):
        ft = ft.detach()
        loss, weight, norm = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= min(fs.shape[-2:]):
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            norm += weight
        total = total + loss / norm
    return total


class ABF(nn.Module):
    """Attention-based fusion of one level: the student's map, fused with the deeper level's residual."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the level's output at ``out_size``, the fused map passed on to the next shallower level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, :1] + residual * att[:, 1:]
        fused = x
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), fused


def as_map(f: torch.Tensor) -> torch.Tensor:
    """A feature as a ``[B, C, H, W]`` map: pooled vectors ``[B, C]`` become 1x1 maps."""
    return f[:, :, None, None] if f.dim() == 2 else f


class ReviewFusion(nn.Module):
    """The ABF chain over levels ordered shallow to deep: student ``[B, C_i, H_i, W_i]`` maps in, maps shaped
    like the teacher's levels out (same order)."""

    def __init__(self, student_channels: Sequence[int], teacher_shapes: Sequence[Sequence[int]],
                 max_mid_channels: int = 512):
        super().__init__()
        mid = min(max_mid_channels, student_channels[-1])
        last = len(student_channels) - 1
        self.out_sizes = [tuple(int(v) for v in s[-2:]) for s in teacher_shapes]
        self.abfs = nn.ModuleList(ABF(c, mid, int(t[0]), fuse=i < last)
                                  for i, (c, t) in enumerate(zip(student_channels, teacher_shapes)))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        residual = None
        for i in reversed(range(len(features))):
            out, residual = self.abfs[i](features[i], residual, self.out_sizes[i])
            outs.insert(0, out)
        return outs
