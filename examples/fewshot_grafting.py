"""Graft a thin student into your own teacher from a few unlabeled images per class (progressive network grafting).

The teacher is a plain nn.Module defined below (trained here with kdkit.train on all labels, standing in for
the model you already have). The student is the same network at a quarter of the width. Grafting then sees
only `--shots` unlabeled images per class: no label is handed over (the images go in alone).

    python examples/fewshot_grafting.py --shots 5
    python examples/fewshot_grafting.py --quick
"""

from __future__ import annotations

import argparse

import torch
from _digits import digits_tensors
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdkit


def convnet(width: int, num_classes: int = 10) -> nn.Sequential:
    """Three blocks in forward order (what grafting swaps one by one), then the classifier."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
        nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", type=int, default=5, help="unlabeled images per class (default 5)")
    p.add_argument("--quick", action="store_true", help="one epoch per stage, for a smoke test")
    p.add_argument("--out", default="runs/examples/grafting", help="folder for the two runs")
    a = p.parse_args()
    torch.manual_seed(0)
    (x, y), test = digits_tensors()
    teacher = kdkit.train(convnet(32), DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True),
                          test_data=test, output_dir=f"{a.out}/teacher", overwrite=True,
                          train={"epochs": 1 if a.quick else 15, "optimizer": "adam", "lr": 0.003})
    # a few images per class, chosen with the labels (as a user picks them), then handed over without them
    few = torch.cat([torch.nonzero(y == c).flatten()[:a.shots] for c in range(10)])
    blocks = ["0", "1", "2"]
    epochs = 1 if a.quick else 300  # one batch of the 10 x shots images per epoch
    student = kdkit.distill(teacher.model, convnet(8), x[few], method="netgraft", test_data=test,
                            teacher_blocks=blocks, student_blocks=blocks, block_epochs=epochs, net_epochs=epochs,
                            data={"shots_per_class": a.shots}, output_dir=f"{a.out}/student", overwrite=True,
                            train={"batch_size": 10 * a.shots})
    print(f"teacher {100 * teacher.test_accuracy:.2f}% -> grafted student {100 * student.test_accuracy:.2f}% "
          f"from {a.shots} unlabeled images per class ({student.summary['params']:,} parameters)")


if __name__ == "__main__":
    main()
