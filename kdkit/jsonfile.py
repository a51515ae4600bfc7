"""JSON files that any reader can parse: ``summary.json`` and the export sidecar are read by tools other than
Python (jq, JavaScript, spreadsheets), whose parsers reject the ``NaN`` and ``Infinity`` that Python's json
module writes by default. A value that is not a finite number is written as ``null``."""

from __future__ import annotations

import json
import math
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
    """Write `obj` as indented, standard JSON (non-finite numbers as null)."""
    path.write_text(json.dumps(strict(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
