"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): the embedded default dataset.

Pixel values 0..16 are scaled to 0..255. There is no official test split: a seeded one is carved
(``data.test_split``, ``data.split_seed``), stratified by class.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import DataConfig
from .images import ImageSet
from .splits import stratified_split


def load(cfg: DataConfig, need_train: bool = True) -> tuple[ImageSet | None, ImageSet]:
    """The test split is carved from the same 1,797 images, so they are read whatever ``need_train`` says."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    full = ImageSet(images, labels, [str(i) for i in range(10)])
    train_idx, test_idx = stratified_split(labels, cfg.test_split, cfg.split_seed)
    return full.subset(train_idx), full.subset(test_idx)
