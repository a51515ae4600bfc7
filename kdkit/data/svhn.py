"""SVHN (Street View House Numbers, cropped digits) in its MATLAB files.

Expected in ``data.root``: ``train_32x32.mat`` and ``test_32x32.mat`` (``extra_32x32.mat`` is not used).
Each holds ``X`` as uint8 ``[32, 32, 3, N]`` and ``y`` as ``[N, 1]`` with the digit 0 stored as label 10;
kdkit maps 10 to 0, so class k is the digit k. Read with ``scipy.io.loadmat`` (scipy comes with scikit-learn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .files import require_root
from .images import ImageSet

CLASSES = [str(i) for i in range(10)]
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _split(root: Path, split: str) -> ImageSet:
    from scipy.io import loadmat

    path = root / FILES[split]
    if not path.is_file():
        raise DataError(f"svhn: {path} not found; put {FILES['train']} and {FILES['test']} (the cropped-digits "
                        "format) in data.root")
    try:
        mat = loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... for damaged files
        raise DataError(f"{path}: not a readable MATLAB file ({str(e)[:160]}); the file is corrupt or truncated, "
                        "download it again") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected the variables X and y of the SVHN cropped-digits format")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{path}: X is {x.dtype} {x.shape} with {len(y)} labels, expected uint8 (32, 32, 3, N)")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise DataError(f"{path}: labels outside 0..10")
    y[y == 10] = 0
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return ImageSet(images, torch.from_numpy(y), CLASSES)


def load(cfg: DataConfig, need_train: bool = True) -> tuple[ImageSet | None, ImageSet]:
    root = require_root(cfg.root, "svhn", f"{FILES['train']} and {FILES['test']}")
    return (_split(root, "train") if need_train else None), _split(root, "test")
