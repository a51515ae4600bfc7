"""Finding and opening dataset files, with errors that say what was expected and where."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from ..errors import DataError


def require_root(root: str | None, dataset: str, expected: str) -> Path:
    if not root:
        raise DataError(f"dataset {dataset!r} needs data.root (--root for kdkit eval): a folder holding {expected}")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DataError(f"data.root {str(p)!r} for dataset {dataset!r} is not a folder; put {expected} there")
    return p


def find(root: Path, names: list[str], subdirs: list[str]) -> Path | None:
    """The first existing ``root/sub/name`` over `subdirs` x `names`."""
    for sub in subdirs:
        for name in names:
            p = root / sub / name if sub else root / name
            if p.is_file():
                return p
    return None


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it ends in .gz; corrupt or truncated archives are a DataError."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read it ({e}); the file is corrupt or truncated, download it again") from None
