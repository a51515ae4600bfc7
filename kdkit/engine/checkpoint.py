"""Atomic checkpoint files: write a temporary file, fsync, then rename over the old one.

The previous checkpoint is kept as ``<name>.prev.pt`` so a crash at any moment leaves at least one
complete file; :func:`load_latest` falls back to it (with a warning) when the newest one is unreadable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, warn


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_suffix(".prev.pt"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def read(path: str | os.PathLike, weights_only: bool = True) -> Any:
    """torch.load with a CheckpointError naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch raises many types for corrupt files (RuntimeError, UnpicklingError, EOFError...)
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a PyTorch file ({_reason(e)}); point at a "
                              "model.pt or checkpoint.pt written by kdkit, or a torch.save'd state_dict") from None


def _reason(e: Exception) -> str:
    """The useful line of a torch.load error (its weights-only errors open with a paragraph about torch 2.6)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        found = [x for x in lines if x.startswith(("Unsupported", "Trying to"))]
        return (found[0] if found else "not a weights-only pickle")[:200] + (
            "; a whole pickled nn.Module is not read: save its state_dict()" if "GLOBAL" in "".join(found) else "")
    return (lines[0] if lines else type(e).__name__)[:200]


def load_latest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The newest readable training state at `path` (or its .prev.pt), None when there is none."""
    path = Path(path)
    prev = path.with_suffix(".prev.pt")
    if not path.exists() and not prev.exists():
        return None
    try:
        return read(path)
    except CheckpointError as e:
        if prev.exists():
            warn(f"{e}; resuming from the previous checkpoint {prev}")
            return read(prev)
        raise
