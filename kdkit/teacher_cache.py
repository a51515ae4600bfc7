"""Teacher outputs kept per training image, so epochs after the first skip the teacher.

A frozen teacher in eval mode gives the same logits and features for the same image every time. When a
stage's images repeat exactly (no random augmentation: ``data.augment`` off, fixed few-shot views), the
engine gives the method a :class:`TeacherCache` for the stage (``train.teacher_cache``, on by default). The method
stores what the teacher produced for each image, keyed by the image's index in its split, and on later
batches it runs the teacher only on the images not stored yet (none, after an epoch or two) and reads the
logits and tapped features of the others. The teacher is frozen and in eval mode, so an image's outputs do not
depend on the rest of its batch, up to the last bits of floating point (kernels differ with batch size); for
that reason the cache is off under ``train.deterministic``, where a resumed run must match bit for bit.

Buffers are allocated on first use, one per output (``[N, *shape]`` for a split of N images), on the
outputs' device while the total stays under ``train.teacher_cache_mb``; past that, they are memory-mapped
files in a temporary folder (removed when the cache is closed), so a cache larger than RAM still works.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

#: numpy dtypes for memory-mapped buffers; other dtypes stay in memory
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64}


class TeacherCache:
    """Named tensors per sample index (``0 <= index < size``), in memory up to `limit_mb`, then on disk."""

    def __init__(self, size: int, limit_mb: float, spill_dir: str | Path | None = None):
        self.size = size
        self.limit_bytes = limit_mb * 2**20
        self.spill_root = spill_dir
        self._spill: Path | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.filled = torch.zeros(size, dtype=torch.bool)
        self.in_memory_bytes = 0
        self.on_disk_bytes = 0
        self.hits = 0  # images whose outputs were read from the cache
        self.misses = 0  # images the teacher was run on

    def missing(self, index: torch.Tensor) -> torch.Tensor:
        """Boolean mask over `index`: the samples not stored yet."""
        return ~self.filled[index.cpu()]

    def gather(self, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The stored outputs of these samples (all stored), on `device`."""
        return {k: buf[index.to(buf.device)].to(device) for k, buf in self.buffers.items()}

    def store(self, index: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        """Keep `outputs` (each ``[len(index), ...]``) for these samples."""
        for k, v in outputs.items():
            buf = self.buffers.get(k)
            if buf is None:
                buf = self.buffers[k] = self._allocate(k, v)
            buf[index.to(buf.device)] = v.detach().to(buf.device, buf.dtype)
        self.filled[index.cpu()] = True

    def count(self, served: int, computed: int) -> None:
        self.hits += served
        self.misses += computed

    def _allocate(self, name: str, like: torch.Tensor) -> torch.Tensor:
        shape = (self.size, *like.shape[1:])
        nbytes = math.prod(shape) * like.element_size()
        if self.in_memory_bytes + nbytes <= self.limit_bytes or like.dtype not in _NUMPY:
            self.in_memory_bytes += nbytes
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="kdkit-teacher-cache-", dir=self.spill_root))
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)
        array = np.lib.format.open_memmap(self._spill / f"{safe}.npy", mode="w+", dtype=_NUMPY[like.dtype],
                                          shape=shape)
        self.on_disk_bytes += nbytes
        return torch.from_numpy(array)

    def close(self) -> None:
        """Drop the buffers and remove the spill folder."""
        self.buffers = {}
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "memory_bytes": self.in_memory_bytes,
                "disk_bytes": self.on_disk_bytes}
