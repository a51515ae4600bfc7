"""JSON files that any reader can parse: ``summary.json`` and the export sidecar are read by tools other than
Python (jq, JavaScript, spreadsheets), whose parsers reject the ``NaN`` and ``Infinity`` that Python's json
module writes by default. A value that is not a finite number is written as ``null``. Files are replaced
atomically (written beside, then renamed), so a reader never sees half a file and a crash never leaves one."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, +-inf) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` to `path` as indented, standard JSON (non-finite numbers as null), atomically; creates the
    parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(strict(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
