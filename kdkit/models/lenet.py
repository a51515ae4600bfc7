"""LeNet-5 and LeNet-5-half, the MNIST teacher/student pair of the data-free KD papers (DAFL, DFAD, RDSKD).

conv(6,5x5)-relu-maxpool, conv(16,5x5)-relu-maxpool, conv(120,5x5)-relu, fc(84)-relu, fc(classes);
LeNet-5-half halves every width (3, 8, 60, 42); ``embed_dim`` sets the embedding width alone. Inputs of
32x32 are used as they are; smaller inputs (MNIST's 28x28) are zero-padded in the first convolution to the
same 32x32 geometry. ``bn=True`` adds a BatchNorm after each convolution (a teacher DeepInversion can
invert: it needs BatchNorm statistics).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import scaled
from .registry import register


class LeNet5(nn.Module):
    kd_stages = ("block1", "block2", "block3", "embed")
    kd_classifier = "classifier"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 32, width: float = 1.0,
                 embed_dim: int | None = None, bn: bool = False):
        super().__init__()
        if input_size < 24:
            raise ValueError(
                f"LeNet-5 needs inputs of at least 24x24, got {input_size}x{input_size}; "
                "resize with data.image_size=32"
            )
        pad = max(0, math.ceil((32 - input_size) / 2))
        c1, c2, c3, f = (scaled(c, width) for c in (6, 16, 120, 84))
        f = embed_dim or f

        def conv(c_in: int, c_out: int, padding: int = 0) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 5, padding=padding, bias=not bn)]
            return [*layers, nn.BatchNorm2d(c_out)] if bn else layers

        self.block1 = nn.Sequential(*conv(in_channels, c1, pad), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*conv(c1, c2), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*conv(c2, c3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(c3, f), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(f, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(self.block3(self.block2(self.block1(x)))))


@register("lenet5", "LeNet-5 (6-16-120-84), the data-free papers' MNIST teacher", default_input_size=32)
def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 32, width: float = 1.0,
           embed_dim: int | None = None, bn: bool = False) -> LeNet5:
    return LeNet5(num_classes, in_channels, input_size, width, embed_dim, bn)


@register("lenet5_half", "LeNet-5-half (3-8-60-42), the data-free papers' MNIST student", default_input_size=32)
def lenet5_half(num_classes: int = 10, in_channels: int = 1, input_size: int = 32, width: float = 1.0,
                embed_dim: int | None = None, bn: bool = False) -> LeNet5:
    """``embed_dim`` overrides the width of the embedding (fc1), e.g. 84 to match LeNet-5's."""
    return LeNet5(num_classes, in_channels, input_size, 0.5 * width, embed_dim, bn)
