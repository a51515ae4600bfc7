"""MNIST-format datasets in the original idx files: mnist, fashion-mnist, kmnist.

Expected in ``data.root`` (or its ``raw/`` or ``<Name>/raw/`` sub-folder, torchvision's layout), with or
without ``.gz``: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``. The idx format: two zero bytes, a type byte (0x08 = uint8), the number of
dimensions, each dimension as a big-endian uint32, then the data.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .files import find, read_bytes, require_root
from .images import ImageSet

CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}
FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def parse_idx(data: bytes, path: Path | str, ndim: int) -> np.ndarray:
    """Decode idx bytes holding a uint8 array of `ndim` dimensions."""
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes is too short for an idx file (truncated?); download it again")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not an idx uint8 file (magic {data[:4].hex()}, expected 0000080{ndim}); "
                        "download the original file again")
    if dims != ndim:
        raise DataError(f"{path}: idx file has {dims} dimensions, expected {ndim}; are images and labels swapped?")
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header; download it again")
    shape = struct.unpack(">" + "I" * dims, data[4:header])
    need = int(np.prod(shape, dtype=np.int64))
    have = len(data) - header
    if have != need:
        state = "truncated" if have < need else "has trailing bytes"
        raise DataError(
            f"{path}: {state}: header says shape {shape} ({need} bytes), file holds {have}; download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _split(root: Path, name: str, split: str) -> ImageSet:
    subdirs = ["", "raw", f"{FOLDERS[name]}/raw", FOLDERS[name]]
    arrays = []
    for base, ndim in zip(FILES[split], (3, 1)):
        path = find(root, [base, base + ".gz"], subdirs)
        if path is None:
            raise DataError(
                f"{name}: {base}[.gz] not found in {root} (nor its raw/ or {FOLDERS[name]}/raw/); "
                f"put the four original idx files ({', '.join(FILES['train'] + FILES['test'])}) there"
            )
        arrays.append((parse_idx(read_bytes(path), path, ndim), path))
    (images, ipath), (labels, lpath) = arrays
    if len(images) != len(labels):
        raise DataError(f"{ipath} holds {len(images)} images but {lpath} holds {len(labels)} labels; the two files "
                        "are from different sets or one is cut short: download both again")
    n_classes = len(CLASSES[name])
    if labels.size and int(labels.max()) >= n_classes:
        raise DataError(f"{lpath}: label {int(labels.max())} outside 0..{n_classes - 1} for {name}")
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                    CLASSES[name])


def loader(name: str):
    def load(cfg: DataConfig, need_train: bool = True) -> tuple[ImageSet | None, ImageSet]:
        root = require_root(cfg.root, name, "the four idx files (train/t10k images and labels, .gz or not)")
        return (_split(root, name, "train") if need_train else None), _split(root, name, "test")

    return load
