"""What is left to run of the benchmark comparisons, and what it costs: for planning a session's queue.

For every spec in benchmarks/compare/ (or the ones given): runs finished (under the checkout's `runs/`, or kept
in the archive benchmarks/results/compare/), started (a worker will resume them) and pending per arm, and the
worker-minutes still to go, estimated from the wall time of the arm's finished runs (its mean over cells; "?"
when none has finished: the spec's header states its planned cost).

    python benchmarks/queue_status.py                      # every spec, from the checkout's root
    python benchmarks/queue_status.py benchmarks/compare/fulllabel_lenet.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from archive_runs import ARCHIVE, archived_dir  # noqa: E402

from kdkit.compare import Run, finished_walls, load_spec, minutes_left, plan  # noqa: E402


def status(spec_path: Path, archive: Path = ARCHIVE) -> list[dict]:
    """Per arm of the spec: finished, started and pending runs, the mean wall time of the finished ones, and the
    estimated worker-minutes left (None when no run of the arm has finished)."""
    spec = load_spec(spec_path)
    runs = plan(spec)

    def summary_of(r: Run) -> Path | None:  # in the run's folder, or kept in the archive
        return next((d / "summary.json" for d in (r.run_dir, archived_dir(spec, r, archive))
                     if (d / "summary.json").is_file()), None)

    walls = finished_walls(runs, summary_of)
    out = []
    for arm in dict.fromkeys(r.arm for r in runs):
        mine = [r for r in runs if r.arm == arm]
        todo = [r for r in mine if summary_of(r) is None]
        minutes, untimed = minutes_left(todo, walls)
        mean = sum(walls[arm]) / len(walls[arm]) if walls.get(arm) else None
        out.append({"arm": arm, "finished": len(mine) - len(todo), "started": sum(r.started for r in todo),
                    "pending": sum(not r.started for r in todo), "wall_s": mean,
                    "minutes_left": None if untimed else minutes})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="*", type=Path)
    ap.add_argument("--archive", type=Path, default=ARCHIVE, help=f"the archive folder (default {ARCHIVE})")
    args = ap.parse_args()
    specs = args.specs or sorted((ROOT / "benchmarks" / "compare").glob("*.yaml"))
    print("| spec | arm | finished | started | pending | wall s / run | worker-min left |")
    print("|---|---|---|---|---|---|---|")
    total, unknown = 0.0, 0
    for spec in specs:
        for row in status(spec, args.archive):
            if row["started"] + row["pending"] == 0:
                continue
            wall = "?" if row["wall_s"] is None else f"{row['wall_s']:.0f}"
            left = "?" if row["minutes_left"] is None else f"{row['minutes_left']:.0f}"
            total += row["minutes_left"] or 0.0
            unknown += row["minutes_left"] is None
            print(f"| {spec.stem} | {row['arm']} | {row['finished']} | {row['started']} | {row['pending']} | "
                  f"{wall} | {left} |")
    print(f"\nestimated: {total:.0f} worker-minutes left, plus {unknown} arm(s) with no finished run to time")


if __name__ == "__main__":
    main()
