"""Shared by the examples: scikit-learn's 8x8 digits as plain tensors, the way a user's own data arrives."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits


def digits_tensors(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)): 1797 images [1, 8, 8] scaled to [0, 1], 20% held out."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return (x[train], y[train]), (x[test], y[test])
