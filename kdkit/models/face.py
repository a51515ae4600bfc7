"""Face-recognition embedding models: MobileFaceNet and the IR-ResNets of ArcFace. Each returns an embedding
``[B, D]`` (``num_classes`` is D: kdkit passes ``embedding.dim`` for ``task: embedding``).

* ``mobilefacenet`` (Chen, Liu, Gao & Han, "MobileFaceNets", 2018): a 3x3 stride-2 conv and a depthwise 3x3
  conv (64), bottlenecks of expansion 2 (64 x5 stride 2, 128 stride 2, 128 x6, 128 stride 2, 128 x2), a 1x1
  conv to 512, the global depthwise convolution (GDConv: a depthwise conv over the whole final map), a linear
  1x1 conv to D and BatchNorm; PReLU activations. At 112x112 the final map is 7x7, as in the paper; any input
  size works (the GDConv takes the final map's size).
* ``ir_resnet18``/``34``/``50`` (Deng et al., ArcFace, 2019: "improved residual" units): a 3x3 conv (64),
  stages of BN-conv-BN-PReLU-conv(stride)-BN units (64, 128, 256, 512), then BN, dropout, flatten, a linear
  layer to D and BatchNorm1d (the "E" output of the paper).

``width`` scales the channels (a half-width student: ``width=0.5``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import init_weights, scaled
from .registry import add


def _conv_bn(cin: int, cout: int, k: int, s: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int = 2):
        super().__init__()
        hidden = cin * expansion
        self.conv = nn.Sequential(_conv_bn(cin, hidden, 1, 1), _conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  _conv_bn(hidden, cout, 1, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


# (channels, repeats, first stride) of MobileFaceNet's bottleneck groups
MFN_SETTINGS = ((64, 5, 2), (128, 1, 2), (128, 6, 1), (128, 1, 2), (128, 2, 1))


class MobileFaceNet(nn.Module):
    def __init__(self, dim: int = 128, in_channels: int = 3, input_size: int = 112, width: float = 1.0):
        super().__init__()
        c64 = scaled(64, width, 8)
        self.stem = nn.Sequential(_conv_bn(in_channels, c64, 3, 2), _conv_bn(c64, c64, 3, 1, groups=c64))
        groups, cin = [], c64
        for c, n, s in MFN_SETTINGS:
            cout = scaled(c, width, 8)
            groups.append(nn.Sequential(*[Bottleneck(cin if i == 0 else cout, cout, s if i == 0 else 1)
                                          for i in range(n)]))
            cin = cout
        self.blocks = nn.Sequential(*groups)
        c512 = scaled(512, width, 8)
        self.conv_last = _conv_bn(cin, c512, 1, 1)
        with torch.no_grad():
            side = self.conv_last(self.blocks(self.stem(torch.zeros(1, in_channels, input_size, input_size)))).shape[-1]
        self.gdconv = _conv_bn(c512, c512, side, 1, groups=c512, act=False)
        self.gdconv[0].padding = (0, 0)
        self.embedding = nn.Sequential(nn.Conv2d(c512, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.Flatten())
        self.kd_stages = (*(f"blocks.{i}" for i in range(len(groups))), "conv_last")
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.gdconv(self.conv_last(self.blocks(self.stem(x)))))


class IRBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IRResNet(nn.Module):
    def __init__(self, blocks: Sequence[int], dim: int = 128, in_channels: int = 3, input_size: int = 112,
                 width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        c0 = scaled(64, width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.PReLU(c0))
        cin, names = c0, []
        for i, (n, c) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            cout = scaled(c, width)
            self.add_module(f"layer{i}", nn.Sequential(*[IRBlock(cin if j == 0 else cout, cout, 2 if j == 0 else 1)
                                                         for j in range(n)]))
            names.append(f"layer{i}")
            cin = cout
        self.kd_stages = tuple(names)
        side = -(-input_size // 16)
        self.output = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(dropout), nn.Flatten(),
                                    nn.Linear(cin * side * side, dim), nn.BatchNorm1d(dim))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.kd_stages:
            x = getattr(self, name)(x)
        return self.output(x)


def mobilefacenet(num_classes: int = 128, in_channels: int = 3, input_size: int = 112,
                  width: float = 1.0) -> MobileFaceNet:
    return MobileFaceNet(num_classes, in_channels, input_size, width)


def ir_resnet(blocks: Sequence[int], num_classes: int = 128, in_channels: int = 3, input_size: int = 112,
              width: float = 1.0, dropout: float = 0.0) -> IRResNet:
    return IRResNet(tuple(blocks), num_classes, in_channels, input_size, width, dropout)


add("mobilefacenet", mobilefacenet, "MobileFaceNet embedding model (GDConv head; num_classes = embedding width)", 112,
    "embedding")
for _n, _b in (("ir_resnet18", (2, 2, 2, 2)), ("ir_resnet34", (3, 4, 6, 3)), ("ir_resnet50", (3, 4, 14, 3))):
    add(_n, ir_resnet, f"ArcFace's IR-ResNet ({_n[3:]}) embedding model (num_classes = embedding width)", 112,
        "embedding", blocks=_b)
