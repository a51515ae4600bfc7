"""Models a user might bring: plain nn.Modules that know nothing about kdkit (used via `module:`)."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1, stride=2), nn.ReLU(),
        )
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def fixed28(num_classes: int = 10) -> nn.Module:
    """A model that only takes 28x28 single-channel images."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))


class NaNOnRank1(nn.Module):
    """A linear classifier whose output turns NaN once, at its `at`-th training forward, on torchrun rank 1 only:
    a fault only one process sees (the processes must still agree to restore together)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 16, at: int = 30):
        super().__init__()
        self.fc = nn.Linear(in_channels * input_size * input_size, num_classes)
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os

        out = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls == self.at and os.environ.get("RANK") == "1":
                return out * float("nan")
        return out
