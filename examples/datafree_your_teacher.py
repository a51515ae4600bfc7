"""Distill your own teacher with no training data at all (RDSKD: a generator learns to produce images the
teacher is confident, diverse and class-balanced on; the student learns from those).

The teacher is a plain nn.Module trained here on digits, standing in for the model you have. The only real
images the distillation sees are the test images, for the final score; the generator is saved with the run
(`kdkit sample RUN_DIR -n 64` draws images from it).

    python examples/datafree_your_teacher.py
    python examples/datafree_your_teacher.py --quick
"""

from __future__ import annotations

import argparse

import torch
from _digits import digits_tensors
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdkit


def mlp(hidden: int, num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="rdskd", choices=["rdskd", "dafl", "dfad"])
    p.add_argument("--quick", action="store_true", help="a few steps, for a smoke test")
    p.add_argument("--out", default="runs/examples/datafree", help="folder for the two runs")
    a = p.parse_args()
    torch.manual_seed(0)
    (x, y), test = digits_tensors()
    teacher = kdkit.train(mlp(256), DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True), test_data=test,
                          output_dir=f"{a.out}/teacher", overwrite=True,
                          train={"epochs": 1 if a.quick else 30, "optimizer": "adam", "lr": 0.003})
    steps = 4 if a.quick else 50
    student = kdkit.distill(teacher.model, mlp(32), None, method=a.method, test_data=test,
                            steps_per_epoch=steps, generator_width=32, latent_dim=32,
                            **({"generator_epochs": 1} if a.quick and a.method == "rdskd" else {}),
                            output_dir=f"{a.out}/student", overwrite=True, data={"val_split": 0},
                            train={"epochs": 1 if a.quick else 20, "select": "last", "batch_size": 128})
    s = student.summary
    print(f"teacher {100 * teacher.test_accuracy:.2f}% -> {a.method} student {100 * student.test_accuracy:.2f}% "
          f"without one training image; generator: {student.run_dir}/{s['generator_file']}")


if __name__ == "__main__":
    main()
