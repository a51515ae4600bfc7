"""File paths packed into two numpy arrays, for file sets of any size.

A list of a million ``Path`` objects costs hundreds of megabytes, and worse, every DataLoader worker forked
from the main process ends up with its own copy: reading ``paths[i]`` touches the object's reference count,
which writes to its memory page, which the kernel then copies (copy-on-write turns into copy-on-read). A
:class:`PathTable` holds the UTF-8 bytes of all paths in one ``uint8`` array and their end offsets in one
``int64`` array; reading an entry touches neither, so the workers share the parent's pages and resident
memory stays flat in the number of files.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np


class PathTable(Sequence[Path]):
    """An immutable sequence of paths (``table[i]`` is a ``Path``) stored as bytes and offsets."""

    def __init__(self, paths: Iterable[str | Path]):
        # consumed one path at a time into two growing buffers: a generator of paths is never held as objects
        buf = bytearray()
        ends = array("q")
        for p in paths:
            buf += str(p).encode("utf-8", "surrogateescape")
            ends.append(len(buf))
        self._bytes = np.frombuffer(buf, dtype=np.uint8)  # views of the buffers, no copies
        self._bytes.flags.writeable = False
        self._ends = np.frombuffer(ends, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, i: int) -> Path: ...

    @overload
    def __getitem__(self, i: slice) -> list[Path]: ...

    def __getitem__(self, i: int | slice) -> Path | list[Path]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"path {i} of a table of {n}")
        i %= n
        start = int(self._ends[i - 1]) if i else 0
        return Path(self._bytes[start:int(self._ends[i])].tobytes().decode("utf-8", "surrogateescape"))

    def __iter__(self) -> Iterator[Path]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths)"

    @property
    def nbytes(self) -> int:
        """Memory held by the table."""
        return self._bytes.nbytes + self._ends.nbytes
