"""CIFAR-10 and CIFAR-100 in their python pickle batches.

Expected in ``data.root``: the folder ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``,
``batches.meta``) or ``cifar-100-python`` (``train``, ``test``, ``meta``), or the root itself holding
those files, or the original archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``), which is
extracted next to itself. Pickles are read with an unpickler that only admits plain containers and
numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .files import read_bytes, require_root
from .images import ImageSet

LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py", "archive": "cifar-10-python.tar.gz",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "meta": "batches.meta", "names": "label_names", "labels": "labels", "classes": 10},
    "cifar100": {"folder": "cifar-100-python", "archive": "cifar-100-python.tar.gz",
                 "train": ["train"], "test": ["test"], "meta": "meta", "names": "fine_label_names",
                 "labels": "fine_labels", "classes": 100},
}

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _Refused(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"it would load {module}.{name}, which no CIFAR batch holds; refusing to unpickle it")


def read_pickle(path: Path) -> dict[str, Any]:
    try:
        obj = _SafeUnpickler(io.BytesIO(read_bytes(path)), encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{path}: {e}; replace it with the file from the official archive") from None
    except Exception as e:  # corrupt pickles raise almost anything (UnpicklingError, EOFError, ValueError, ...)
        raise DataError(f"{path}: not a readable CIFAR pickle batch ({e}); the file is corrupt or truncated, "
                        "download it again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _folder(root: Path, name: str) -> Path:
    lay = LAYOUT[name]
    for cand in (root / lay["folder"], root):
        if (cand / lay["test"][0]).is_file():
            return cand
    archive = root / lay["archive"]
    if archive.is_file():
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{archive}: cannot extract it ({e}); the archive is corrupt, download it again") from None
        if (root / lay["folder"] / lay["test"][0]).is_file():
            return root / lay["folder"]
    raise DataError(
        f"{name}: no {lay['folder']}/ (with {', '.join(lay['train'] + lay['test'])}) and no {lay['archive']} "
        f"in {root}; put the python version of the dataset there"
    )


def _batches(folder: Path, files: list[str], name: str) -> tuple[np.ndarray, np.ndarray]:
    lay = LAYOUT[name]
    xs, ys = [], []
    for f in files:
        path = folder / f
        if not path.is_file():
            expected = ", ".join(lay["train"] + lay["test"])
            raise DataError(f"{name}: {path} is missing; the folder should hold {expected}")
        d = read_pickle(path)
        if "data" not in d or lay["labels"] not in d:
            raise DataError(f"{path}: missing 'data' or '{lay['labels']}' entries; is this a {name} batch?")
        try:
            data = np.asarray(d["data"])
            labels = np.asarray(d[lay["labels"]], dtype=np.int64).reshape(-1)
        except (ValueError, TypeError, OverflowError) as e:
            raise DataError(f"{path}: 'data' or '{lay['labels']}' is not an array ({e}); is this a {name} "
                            "batch?") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072) rows of 32x32x3")
        if len(labels) != len(data) or (labels.size and (labels.min() < 0 or labels.max() >= lay["classes"])):
            raise DataError(f"{path}: labels do not match the images or fall outside 0..{lay['classes'] - 1}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def loader(name: str):
    def load(cfg: DataConfig, need_train: bool = True) -> tuple[ImageSet | None, ImageSet]:
        lay = LAYOUT[name]
        root = require_root(cfg.root, name, f"{lay['folder']}/ or {lay['archive']}")
        folder = _folder(root, name)
        classes = [str(i) for i in range(lay["classes"])]
        meta = folder / lay["meta"]
        if meta.is_file():
            names = read_pickle(meta).get(lay["names"])
            if names is not None and len(names) == lay["classes"]:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        sets = []
        for split in ("train", "test") if need_train else ("test",):
            x, y = _batches(folder, lay[split], name)
            sets.append(ImageSet(torch.from_numpy(x.copy()), torch.from_numpy(y), classes))
        return (sets[0] if need_train else None), sets[-1]

    return load
