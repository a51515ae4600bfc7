"""Keep a comparison queue's results in git, and put them back, so that a queue can span several sessions.

A queue writes under ``runs/`` (ignored by git). ``save`` copies what the report and a resumed queue need into
``benchmarks/results/compare/<spec name>/``: every finished run's ``summary.json``, ``config.yaml`` and
``metrics.jsonl`` (no checkpoints, no logs), the queue record and the report, and each prepare run (the
teachers) with the files the arms read: its ``model.pt`` and, for an embedding teacher, its ``head.pt`` (head
sharing reads it). ``restore`` copies them back into ``runs/``: the harness
then counts those runs as finished (it never redoes a run whose ``summary.json`` exists) and continues the queue.

    python benchmarks/archive_runs.py save benchmarks/compare/fashion_baselines.yaml
    python benchmarks/archive_runs.py restore benchmarks/compare/fashion_baselines.yaml

Run from the repository root (the spec's folders are relative to it). Unfinished runs are not saved: a queue
restored from the archive starts them again from scratch.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdkit.compare import Run, Spec, also_stem, load_spec, plan  # noqa: E402

RUN_FILES = ("summary.json", "config.yaml", "metrics.jsonl")
PREPARE_FILES = (*RUN_FILES, "model.pt", "head.pt")  # a prepare run keeps what the arms read
REPORT_FILES = ("queue.json", "compare.json", "compare.md", "compare.png")
ARCHIVE = Path("benchmarks/results/compare")


def archived_dir(spec: Spec, r: Run, archive: Path) -> Path:
    """Where run `r` of `spec` is kept in `archive`: a prepare run under its key, an arm's run as under runs/."""
    home = archive / spec.name
    return home / r.key if r.seed is None else home / r.run_dir.relative_to(spec.out)


def _pairs(spec_path: str, archive: Path) -> list[tuple[Path, Path, tuple[str, ...]]]:
    """(folder under runs/, its place in the archive, the files to copy) for every finished run and the report
    (with the reports on the spec's further metrics, ``also``)."""
    spec = load_spec(spec_path)
    also = tuple(f"{also_stem(m)}.{ext}" for m in spec.also for ext in ("json", "md", "png"))
    pairs = [(spec.out, archive / spec.name, REPORT_FILES + also)]
    for r in plan(spec):
        pairs.append((r.run_dir, archived_dir(spec, r, archive), PREPARE_FILES if r.seed is None else RUN_FILES))
    return pairs


def _copy(src: Path, dst: Path, names: tuple[str, ...]) -> int:
    if not (src / "summary.json").is_file() and "queue.json" not in names:
        return 0  # unfinished: a restored queue starts it again
    copied = 0
    for name in names:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied += 1
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["save", "restore"])
    ap.add_argument("spec", help="a comparison spec, e.g. benchmarks/compare/fulllabel_lenet.yaml")
    ap.add_argument("--archive", type=Path, default=ARCHIVE, help=f"the archive folder (default {ARCHIVE})")
    a = ap.parse_args(argv)
    n = 0
    for run_dir, kept, names in _pairs(a.spec, a.archive):
        n += _copy(run_dir, kept, names) if a.action == "save" else _copy(kept, run_dir, names)
    print(f"{a.action}: {n} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
