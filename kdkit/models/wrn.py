"""Wide ResNets (Zagoruyko & Komodakis 2016) for 32x32 images: WRN-d-w, ``depth = 6n + 4``.

Pre-activation basic blocks in three stages of widths 16w, 32w, 64w; ``wrn_40_2`` and ``wrn_16_2`` are
the RepDistiller pair, ``wrn_16_1`` the RDSKD SVHN student. Any ``wrn_D_W`` name works.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import init_weights, scaled
from .registry import add


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(self.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    kd_stages = ("layer1", "layer2", "layer3")
    kd_classifier = "fc"

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40...), got {depth}")
        if widen < 1:
            raise ValueError(f"WRN widen factor must be >= 1, got {widen}")
        n = (depth - 4) // 6
        c0 = scaled(16, width)
        chans = [scaled(16 * widen, width), scaled(32 * widen, width), scaled(64 * widen, width)]
        self.stem = nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False)
        cin = c0
        for i, (c, s) in enumerate(zip(chans, (1, 2, 2)), start=1):
            blocks = [PreActBlock(cin if j == 0 else c, c, s if j == 0 else 1, dropout) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = c
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.head(x))


def wrn(depth: int = 16, widen: int = 1, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
        width: float = 1.0, dropout: float = 0.0) -> WideResNet:
    return WideResNet(depth, widen, num_classes, in_channels, width, dropout)


add("wrn", wrn, "Wide ResNet, any depth (6n+4) and widen factor: wrn depth=28 widen=10, or wrn_28_10")
for _d, _w in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10)):
    add(f"wrn_{_d}_{_w}", wrn, f"Wide ResNet-{_d}-{_w}", depth=_d, widen=_w)
