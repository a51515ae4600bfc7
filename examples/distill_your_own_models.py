"""Distill your own student from your own teacher, from Python, with layers addressed by name.

Neither model comes from kdkit's zoo: they are plain nn.Modules defined below. The teacher is trained with
kdkit.train, then the student learns from it with FitNets hints between two named layers plus soft targets.

    python examples/distill_your_own_models.py            # under a minute on 2 CPU cores
    python examples/distill_your_own_models.py --quick    # a few seconds (what the test runs)
"""

from __future__ import annotations

import argparse

import torch
from _digits import digits_tensors
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdkit


class ConvNet(nn.Module):
    """Two conv blocks and a linear head; `width` sets the channels."""

    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width),
                                    nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one epoch each, for a smoke test")
    p.add_argument("--out", default="runs/examples/own_models", help="folder for the two runs")
    a = p.parse_args()
    epochs = 1 if a.quick else 40
    torch.manual_seed(0)
    (x, y), test = digits_tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    common = {"train": {"epochs": epochs, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}}

    teacher = kdkit.train(ConvNet(width=32), loader, test_data=test, output_dir=f"{a.out}/teacher", overwrite=True,
                          **common)
    # the student's block2 (16 channels) learns the teacher's block2 (64 channels) through a 1x1 adapter
    student = kdkit.distill(teacher.model, ConvNet(width=8), loader, method="fitnets", test_data=test,
                            pairs=[["block2", "block2"]], hint_weight=1.0, kd_weight=1.0,
                            output_dir=f"{a.out}/student", overwrite=True, **common)
    print(f"teacher {100 * teacher.test_accuracy:.2f}% ({teacher.summary['params']:,} parameters) -> "
          f"student {100 * student.test_accuracy:.2f}% ({student.summary['params']:,} parameters); "
          f"run: {student.run_dir}")


if __name__ == "__main__":
    main()
