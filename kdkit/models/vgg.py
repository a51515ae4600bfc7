"""VGG networks for small images (Simonyan & Zisserman 2015, CIFAR layout of RepDistiller).

Five stages of 3x3 convolutions (``stage1``..``stage5``); stages 1-4 end with a 2x2 max-pool
(ceil mode, so small inputs still work), stage 5 is followed by global average pooling and a single
linear ``classifier``. vgg8 has one conv per stage; vgg11/13/16/19 follow the original layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import conv_bn_relu, init_weights, scaled
from .registry import add

LAYOUTS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
    kd_stages = ("stage1", "stage2", "stage3", "stage4", "stage5")
    kd_classifier = "classifier"

    def __init__(self, depth: int, batch_norm: bool = False, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0):
        super().__init__()
        if depth not in LAYOUTS:
            raise ValueError(f"VGG depth must be one of {sorted(LAYOUTS)}, got {depth}")
        cin = in_channels
        for i, stage in enumerate(LAYOUTS[depth], start=1):
            layers: list[nn.Module] = []
            for c in stage:
                cout = scaled(c, width)
                layers += conv_bn_relu(cin, cout, bn=batch_norm)
                cin = cout
            if i < 5:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            self.add_module(f"stage{i}", nn.Sequential(*layers))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.kd_stages:
            x = getattr(self, name)(x)
        return self.classifier(self.pool(x))


def vgg(depth: int = 16, batch_norm: bool = False, num_classes: int = 10, in_channels: int = 3,
        input_size: int = 32, width: float = 1.0) -> VGG:
    return VGG(depth, batch_norm, num_classes, in_channels, width)


for _d in sorted(LAYOUTS):
    add(f"vgg{_d}", vgg, f"VGG-{_d} for 32x32 inputs", depth=_d, batch_norm=False)
    add(f"vgg{_d}_bn", vgg, f"VGG-{_d} with BatchNorm for 32x32 inputs", depth=_d, batch_norm=True)
