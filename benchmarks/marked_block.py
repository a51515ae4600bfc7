"""Write generated text into a Markdown file between a named pair of marker lines, leaving the rest untouched.

    <!-- NAME:begin -->
    ... replaced by the generating script ...
    <!-- NAME:end -->

So that a table in BENCHMARKS.md is always a script's output, never typed by hand (claims.py, per_seed.py).
"""

from __future__ import annotations

from pathlib import Path


def markers(key: str) -> tuple[str, str]:
    """The begin and end marker lines of block `key`."""
    return f"<!-- {key}:begin -->", f"<!-- {key}:end -->"


def write_block(path: Path, key: str, text: str) -> None:
    """Replace the text between the marker lines of block `key` in `path` with `text`."""
    begin, end = markers(key)
    doc = path.read_text()
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise SystemExit(f"{path}: needs exactly one line {begin} followed by one line {end} around the block; "
                         f"add them where the generated text belongs")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
