"""MobileNetV2 (Sandler et al. 2018) for 32x32 images.

Inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1) in seven groups ``blocks.0``..``blocks.6``;
the stem and the second group use stride 1 instead of 2 so 32x32 inputs end at 4x4. Widths scale with
``width`` (rounded to multiples of 8).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import init_weights, scaled
from .registry import register

# expansion t, channels c, repeats n, first stride s (CIFAR strides)
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    kd_classifier = "classifier"

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        c0 = scaled(32, width, 8)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0),
                                  nn.ReLU6(inplace=True))
        cin = c0
        groups = []
        for t, c, n, s in SETTINGS:
            cout = scaled(c, width, 8)
            groups.append(nn.Sequential(*[InvertedResidual(cin if i == 0 else cout, cout, s if i == 0 else 1, t)
                                          for i in range(n)]))
            cin = cout
        self.blocks = nn.Sequential(*groups)
        self.kd_stages = tuple(f"blocks.{i}" for i in range(len(groups)))
        last = scaled(1280, max(1.0, width), 8)
        self.conv_last = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last),
                                       nn.ReLU6(inplace=True))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.conv_last(self.blocks(self.stem(x)))))


@register("mobilenetv2", "MobileNetV2 for 32x32 inputs (width multiplier: width=0.5)")
def mobilenetv2(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: float = 1.0,
                dropout: float = 0.0) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, width, dropout)
