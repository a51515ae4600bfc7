"""Per-seed table of a comparison (one Markdown row per arm, one column per cell, the seeds' values in order),
read from its report compare.json: for tuning comparisons with two or three seeds, where an interval says little
and the seeds' values say more.

    python benchmarks/per_seed.py benchmarks/results/compare/tune-lowlabel
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(report: dict) -> str:
    cells = list(report["cells"])
    arms: list[str] = []
    for c in cells:
        arms += [a for a in report["cells"][c]["arms"] if a not in arms]
    lines = [f"| arm | {' | '.join(cells)} |", "|---|" + "---|" * len(cells)]
    for a in arms:
        row = []
        for c in cells:
            per_seed = (report["cells"][c]["arms"].get(a) or {}).get("per_seed", {})
            row.append(" / ".join(f"{100 * v:.1f}" for _, v in sorted(per_seed.items(), key=lambda kv: int(kv[0])))
                       or "not run yet")
        lines.append(f"| {a} | {' | '.join(row)} |")
    seeds = ", ".join(str(s) for s in report.get("seeds", []))
    return f"{report['metric']} (%), seeds {seeds} in order\n\n" + "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a comparison's folder (holding compare.json)")
    a = p.parse_args()
    print(table(json.loads((Path(a.folder) / "compare.json").read_text())))


if __name__ == "__main__":
    main()
