"""Per-seed table of a comparison (one Markdown row per arm, one column per cell, the seeds' values in order),
read from its report compare.json: for tuning comparisons with two or three seeds, where an interval says little
and the seeds' values say more.

    python benchmarks/per_seed.py benchmarks/results/compare/tune-lowlabel
    python benchmarks/per_seed.py benchmarks/results/compare/tune-lowlabel --write BENCHMARKS.md --key tune-lowlabel

`--write` puts the table into that file between the lines `<!-- KEY:begin -->` and `<!-- KEY:end -->`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from marked_block import markers, write_block


def table(report: dict, decimals: int = 1) -> str:
    cells = list(report["cells"])
    arms: list[str] = []
    for c in cells:
        arms += [a for a in report["cells"][c]["arms"] if a not in arms]
    lines = [f"| arm | {' | '.join(cells)} |", "|---|" + "---|" * len(cells)]
    for a in arms:
        row = []
        for c in cells:
            per_seed = (report["cells"][c]["arms"].get(a) or {}).get("per_seed", {})
            values = [v for _, v in sorted(per_seed.items(), key=lambda kv: int(kv[0]))]
            row.append(" / ".join(f"{100 * v:.{decimals}f}" for v in values) or "not run yet")
        lines.append(f"| {a} | {' | '.join(row)} |")
    seeds = ", ".join(str(s) for s in report.get("seeds", []))
    return f"{report['metric']} (%), seeds {seeds} in order\n\n" + "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a comparison's folder (holding compare.json)")
    p.add_argument("--decimals", type=int, default=1, help="decimals of the percentages (default 1)")
    p.add_argument("--write", metavar="FILE", help="put the table into this Markdown file between --key's markers")
    p.add_argument("--key", help="the block's name: markers {} and {}".format(*markers("KEY")))
    a = p.parse_args()
    if a.write and not a.key:
        p.error("--write needs --key (the name in the file's <!-- KEY:begin --> line)")
    text = table(json.loads((Path(a.folder) / "compare.json").read_text()), a.decimals)
    if a.write:
        write_block(Path(a.write), a.key, text)
    print(text)


if __name__ == "__main__":
    main()
