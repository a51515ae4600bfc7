"""A multi-layer perceptron on flattened inputs: images, sequences or vectors."""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

from .common import scaled
from .registry import register


class MLP(nn.Module):
    kd_classifier = "classifier"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
                 hidden: tuple[int, ...] | list[int] = (512, 256), width: float = 1.0, dropout: float = 0.0,
                 input_shape: tuple[int, ...] | list[int] | None = None):
        super().__init__()
        if not hidden:
            raise ValueError("an MLP needs at least one hidden layer (hidden=[...])")
        features = math.prod(input_shape) if input_shape else in_channels * input_size * input_size
        sizes = [features] + [scaled(h, width) for h in hidden]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(dropout)) for a, b in pairwise(sizes)
        )
        self.kd_stages = tuple(f"layers.{i}" for i in range(len(self.layers)))
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


@register("mlp", "MLP on flattened inputs: images, sequences, vectors (hidden=[512, 256])", default_input_size=28)
def mlp(num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
        hidden: tuple[int, ...] | list[int] = (512, 256), width: float = 1.0, dropout: float = 0.0,
        input_shape: tuple[int, ...] | list[int] | None = None) -> MLP:
    """``input_shape`` (one sample's, filled in from the data) sets the input width; without it, images of
    ``in_channels x input_size x input_size``."""
    return MLP(num_classes, in_channels, input_size, tuple(hidden), width, dropout, input_shape)
