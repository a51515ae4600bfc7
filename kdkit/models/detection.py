"""A compact anchor-free detector on the zoo's backbones: CenterNet-style heads over a small feature pyramid.

``centernet_<backbone>`` (Zhou, Wang & Krähenbühl, "Objects as Points", 2019): the backbone's last stage
(``backbone.stages.<n>``) is projected to ``head_channels`` (a 1x1 conv), a coarser level is made from it (a
3x3 stride-2 conv), upsampled back and added (a two-level top-down pyramid, as in FPN), smoothed by a 3x3
conv (``neck``); three heads of a 3x3 conv and a 1x1 conv then give the class heatmaps, the box sizes and the
centre offsets, concatenated into one output ``[B, K + 4, H/s, W/s]`` (s: the backbone's stride, 4 for the
CIFAR ResNets, 8 for MobileNetV2; the layout is :mod:`kdkit.tasks.detection`'s). The heatmap bias starts at
-2.19 (a prior probability of 0.1, as CenterNet). ``width`` scales backbone and heads alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import conv_bn_relu, init_weights, scaled
from .registry import add
from .segmentation import BACKBONES, Backbone


def _head(c: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, out, 1))


class CenterNet(nn.Module):
    def __init__(self, backbone: str, num_classes: int, in_channels: int, input_size: int, width: float,
                 head_channels: int):
        super().__init__()
        self.backbone = Backbone(backbone, in_channels, input_size, width)
        c = scaled(head_channels, width)
        self.lateral = nn.Sequential(*conv_bn_relu(self.backbone.channels[-1], c, 1))
        self.coarser = nn.Sequential(*conv_bn_relu(c, c, 3, stride=2))
        self.neck = nn.Sequential(*conv_bn_relu(c, c, 3))
        self.heatmap, self.size, self.offset = _head(c, num_classes), _head(c, 2), _head(c, 2)
        self.kd_stages = (*(f"backbone.stages.{i}" for i in range(len(self.backbone.stages))), "neck")
        self.kd_classifier = "heatmap"
        init_weights(self)
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.lateral(self.backbone(x)[-1])
        q = self.coarser(p)
        p = self.neck(p + F.interpolate(q, size=p.shape[-2:], mode="nearest"))
        return torch.cat([self.heatmap(p), self.size(p), self.offset(p)], 1)


def centernet(backbone: str, num_classes: int = 10, in_channels: int = 1, input_size: int = 96, width: float = 1.0,
              head_channels: int = 64) -> CenterNet:
    return CenterNet(backbone, num_classes, in_channels, input_size, width, head_channels)


for _b in BACKBONES:
    add(f"centernet_{_b}", centernet, f"CenterNet-style detector (heatmaps, sizes, offsets) on {_b}", 96,
        "detection", backbone=_b)
