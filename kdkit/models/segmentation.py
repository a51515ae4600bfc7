"""Segmentation models on the zoo's backbones: a DeepLabv3-style head with ASPP and a U-Net-style decoder.

The backbone is a zoo classifier (``resnet8``..``resnet32``, ``resnet18``, ``mobilenetv2``) without its pool
and classifier: its stem and stages (``backbone.stages.0``, ...). Both heads return logits
``[B, K, H, W]`` at the input's size (the last step is a bilinear upsampling), and declare their stages for
taps (``kd_stages``: the backbone's stages, then the head's feature map before the classifier).

* ``deeplab_<backbone>``: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation"
  (DeepLabv3, 2017): atrous spatial pyramid pooling over the last stage (a 1x1 branch, three 3x3 branches at
  dilation ``rates``, and image-level pooling), projected by a 1x1 conv, then a 3x3 conv and a 1x1
  classifier. The dilations default to (2, 4, 6), scaled to the small feature maps of small images.
* ``unet_<backbone>``: Ronneberger et al., "U-Net" (2015)-style decoder: from the deepest stage up, upsample
  x2, concatenate the stage output of that resolution, two 3x3 conv-BN-ReLU; a 1x1 classifier at the
  resolution of the stem.

``width`` scales the backbone and the head alike (a half-width student: ``width=0.5``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..taps import resolve
from .common import conv_bn_relu, init_weights, scaled
from .registry import add, create

BACKBONES = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet18", "mobilenetv2")


class Backbone(nn.Module):
    """A zoo classifier's stem and stages; returns every stage's output."""

    def __init__(self, arch: str, in_channels: int, input_size: int, width: float):
        super().__init__()
        model = create(arch, num_classes=1, in_channels=in_channels, input_size=input_size, width=width)
        self.stem = model.stem
        self.stages = nn.ModuleList([resolve(model, p) for p in model.kd_stages])
        with torch.no_grad():
            was = self.training
            self.eval()
            shapes = [f.shape for f in self(torch.zeros(1, in_channels, input_size, input_size))]
            self.train(was)
        #: channels and spatial side of each stage's output at `input_size`
        self.channels = [s[1] for s in shapes]
        self.sides = [s[-1] for s in shapes]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(*conv_bn_relu(cin, cout, 1))])
        for r in rates:
            self.branches.append(nn.Sequential(nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False),
                                               nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        self.project = nn.Sequential(*conv_bn_relu(cout * (len(rates) + 2), cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [b(x) for b in self.branches]
        parts.append(self.pooled(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(parts, 1))


class DeepLabV3(nn.Module):
    kd_classifier = "classifier"

    def __init__(self, backbone: str, num_classes: int, in_channels: int, input_size: int, width: float,
                 head_channels: int, rates: Sequence[int]):
        super().__init__()
        self.backbone = Backbone(backbone, in_channels, input_size, width)
        c = scaled(head_channels, width)
        self.aspp = ASPP(self.backbone.channels[-1], c, rates)
        self.head = nn.Sequential(*conv_bn_relu(c, c, 3))
        self.classifier = nn.Conv2d(c, num_classes, 1)
        self.kd_stages = (*(f"backbone.stages.{i}" for i in range(len(self.backbone.stages))), "head")
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(self.aspp(self.backbone(x)[-1]))
        return F.interpolate(self.classifier(f), size=x.shape[-2:], mode="bilinear", align_corners=False)


class UNet(nn.Module):
    kd_classifier = "classifier"

    def __init__(self, backbone: str, num_classes: int, in_channels: int, input_size: int, width: float,
                 head_channels: int):
        super().__init__()
        self.backbone = Backbone(backbone, in_channels, input_size, width)
        sides, chans = self.backbone.sides, self.backbone.channels
        # the last stage at each resolution, deepest first: the skips the decoder climbs
        self.skips = [i for i in range(len(sides)) if i == len(sides) - 1 or sides[i + 1] != sides[i]][::-1]
        c = scaled(head_channels, width)
        self.entry = nn.Sequential(*conv_bn_relu(chans[self.skips[0]], c, 1))
        self.blocks = nn.ModuleList([nn.Sequential(*conv_bn_relu(c + chans[i], c, 3), *conv_bn_relu(c, c, 3))
                                     for i in self.skips[1:]])
        self.classifier = nn.Conv2d(c, num_classes, 1)
        last = f"blocks.{len(self.blocks) - 1}" if len(self.blocks) else "entry"
        self.kd_stages = (*(f"backbone.stages.{i}" for i in range(len(self.backbone.stages))), last)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        y = self.entry(feats[self.skips[0]])
        for i, block in zip(self.skips[1:], self.blocks):
            skip = feats[i]
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], 1))
        return F.interpolate(self.classifier(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplab(backbone: str, num_classes: int = 11, in_channels: int = 1, input_size: int = 64, width: float = 1.0,
            head_channels: int = 64, rates: Sequence[int] = (2, 4, 6)) -> DeepLabV3:
    return DeepLabV3(backbone, num_classes, in_channels, input_size, width, head_channels, tuple(rates))


def unet(backbone: str, num_classes: int = 11, in_channels: int = 1, input_size: int = 64, width: float = 1.0,
         head_channels: int = 32) -> UNet:
    return UNet(backbone, num_classes, in_channels, input_size, width, head_channels)


for _b in BACKBONES:
    add(f"deeplab_{_b}", deeplab, f"DeepLabv3-style segmentation (ASPP) on {_b}", 64, "segmentation", backbone=_b)
    add(f"unet_{_b}", unet, f"U-Net-style segmentation decoder on {_b}", 64, "segmentation", backbone=_b)
