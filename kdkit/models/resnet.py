"""ResNets for small (32x32) images.

* CIFAR ResNets (He et al. 2016, as in the RepDistiller/CRD benchmark): a 3x3 stem and three stages of
  basic blocks, ``depth = 6n + 2``; resnet8..110 with widths 16-32-64, and the x4 variants
  resnet8x4/resnet32x4 with 64-128-256 (stem 32).
* ResNet-18/34 for 32x32 inputs: the ImageNet block layout with a 3x3 stride-1 stem and no max-pool.

Shortcuts that change shape use a 1x1 convolution and BatchNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import init_weights, scaled
from .registry import add


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of basic blocks (``layer1``..``layerK``), global average pool, ``fc``."""

    kd_classifier = "fc"

    def __init__(self, blocks: Sequence[int], channels: Sequence[int], stem: int, strides: Sequence[int],
                 num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        stem_c = scaled(stem, width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_c, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_c),
                                  nn.ReLU(inplace=True))
        cin = stem_c
        names = []
        for i, (n, c, s) in enumerate(zip(blocks, channels, strides), start=1):
            cout = scaled(c, width)
            layer = nn.Sequential(*[BasicBlock(cin if j == 0 else cout, cout, s if j == 0 else 1) for j in range(n)])
            self.add_module(f"layer{i}", layer)
            names.append(f"layer{i}")
            cin = cout
        self.kd_stages = tuple(names)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.kd_stages:
            x = getattr(self, name)(x)
        return self.fc(self.pool(x))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 width: float = 1.0, base: int = 16, stem: int | None = None) -> ResNet:
    """CIFAR ResNet of `depth` (6n+2) with stage widths base, 2*base, 4*base."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110...), got {depth}")
    n = (depth - 2) // 6
    return ResNet((n, n, n), (base, 2 * base, 4 * base), stem if stem is not None else base, (1, 2, 2),
                  num_classes, in_channels, width)


def resnet_imagenet_layout(blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                           input_size: int = 32, width: float = 1.0) -> ResNet:
    return ResNet(blocks, (64, 128, 256, 512), 64, (1, 2, 2, 2), num_classes, in_channels, width)


for _d in (8, 14, 20, 32, 44, 56, 110):
    add(f"resnet{_d}", cifar_resnet, f"CIFAR ResNet-{_d} (16-32-64)", depth=_d)
add("resnet8x4", cifar_resnet, "CIFAR ResNet-8, 4x wide (64-128-256)", depth=8, base=64, stem=32)
add("resnet32x4", cifar_resnet, "CIFAR ResNet-32, 4x wide (64-128-256)", depth=32, base=64, stem=32)
add("resnet18", resnet_imagenet_layout, "ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)", blocks=(2, 2, 2, 2))
add("resnet34", resnet_imagenet_layout, "ResNet-34 for 32x32 inputs (3x3 stem, no max-pool)", blocks=(3, 4, 6, 3))
