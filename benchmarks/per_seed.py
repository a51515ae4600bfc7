"""Per-seed table of a comparison (one Markdown row per arm, one column per cell, the seeds' values in order),
read from its report compare.json: for tuning comparisons with two or three seeds, where an interval says little
and the seeds' values say more. With `--means`, the cells side by side instead: per arm and cell the mean +- 95%
interval with its number of seeds, and the paired difference against the spec's baseline arm (or the arms of
`--against`), for all cells or those of `--cells`.

    python benchmarks/per_seed.py benchmarks/results/compare/tune-lowlabel
    python benchmarks/per_seed.py benchmarks/results/compare/tune-lowlabel --write BENCHMARKS.md --key tune-lowlabel
    python benchmarks/per_seed.py benchmarks/results/compare/fulllabel-lenet --means --decimals 2
    python benchmarks/per_seed.py benchmarks/results/compare/resnet --means --cells data=fashion-mnist,labels=all \
        --against kd adaptive th_kd --wall

`--write` puts the table into that file between the lines `<!-- KEY:begin -->` and `<!-- KEY:end -->`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from marked_block import markers, write_block


def table(report: dict, decimals: int = 1, arms: list[str] | None = None) -> str:
    cells = list(report["cells"])
    lines = [f"| arm | {' | '.join(cells)} |", "|---|" + "---|" * len(cells)]
    for a in arms or _arms(report):
        row = []
        for c in cells:
            per_seed = (report["cells"][c]["arms"].get(a) or {}).get("per_seed", {})
            values = [v for _, v in sorted(per_seed.items(), key=lambda kv: int(kv[0]))]
            row.append(" / ".join(f"{100 * v:.{decimals}f}" for v in values) or "not run yet")
        lines.append(f"| {a} | {' | '.join(row)} |")
    seeds = ", ".join(str(s) for s in report.get("seeds", []))
    return f"{report['metric']} (%), seeds {seeds} in order\n\n" + "\n".join(lines)


def _arms(report: dict) -> list[str]:
    arms: list[str] = []
    for c in report["cells"].values():
        arms += [a for a in c["arms"] if a not in arms]
    return arms


def _check_known(kind: str, asked: list[str], known: list[str]) -> None:
    """A clear error for any of `asked` not among the report's `known` cells or arms, naming those it has."""
    unknown = [a for a in asked if a not in known]
    if unknown:
        raise SystemExit(f"no {kind} {', '.join(unknown)} in the report; its {kind}s: {', '.join(known)}")


def means_table(report: dict, decimals: int = 2, *, cells: list[str] | None = None, arms: list[str] | None = None,
                against: list[str] | None = None, wall: bool = False) -> str:
    """Per arm (rows) and cell (column groups): mean +- 95% half-width (seeds), then for each arm of `against`
    (default: the spec's baseline) the paired difference against it with its 95% interval, in points; with
    `wall`, the mean wall time of a run in minutes as well. `cells`, `arms`: only these, in this order."""
    cells = cells or list(report["cells"])
    against = against or [report["baseline"]]
    _check_known("cell", cells, list(report["cells"]))
    _check_known("arm", (arms or []) + against, _arms(report))
    group = ["{c}"] + [f"vs {b}" for b in against] + (["min per run"] if wall else [])
    head = [h.format(c=c) for c in cells for h in group]
    lines = [f"| arm | {' | '.join(head)} |", "|---|" + "---|" * len(head)]
    for a in arms or _arms(report):
        row = []
        for c in cells:
            arm = report["cells"][c]["arms"].get(a) or {}
            iv = arm.get("metric") or {"n": 0}
            if not iv["n"]:
                row += ["not run yet"] + [""] * (len(group) - 1)
                continue
            hw = "" if iv["n"] < 2 else f" +- {100 * iv['half_width']:.{decimals}f}"
            row.append(f"{100 * iv['mean']:.{decimals}f}{hw} ({iv['n']})")
            for b in against:
                pair = next((p for p in report["cells"][c]["pairs"] if p["arm"] == a and p["against"] == b), None)
                d = pair["diff"] if pair else None
                row.append("" if not d or d["n"] < 2 else
                           f"{100 * d['mean']:+.{decimals}f} [{100 * d['low']:+.{decimals}f}, "
                           f"{100 * d['high']:+.{decimals}f}] ({d['n']})")
            if wall:
                w = arm.get("wall_s") or {"n": 0}
                row.append(f"{w['mean'] / 60:.1f}" if w["n"] else "")
        lines.append(f"| {a} | {' | '.join(row)} |")
    return (f"{report['metric']} (%), mean +- 95% interval (seeds); against {', '.join(against)}: paired "
            f"difference in points [95% interval] (paired seeds)" + ("; wall time of a run (min)" if wall else "")
            + "\n\n" + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a comparison's folder (holding compare.json)")
    p.add_argument("--decimals", type=int, default=1, help="decimals of the percentages (default 1)")
    p.add_argument("--means", action="store_true", help="means and paired differences against the baseline, "
                                                        "not the seeds' values")
    p.add_argument("--cells", nargs="+", metavar="CELL", help="with --means: only these cells, in this order")
    p.add_argument("--arms", nargs="+", metavar="ARM", help="only these arms (rows), in this order")
    p.add_argument("--against", nargs="+", metavar="ARM",
                   help="with --means: the arms to give each arm's paired difference against (default: the "
                        "spec's baseline)")
    p.add_argument("--wall", action="store_true", help="with --means: a column with each arm's mean wall time")
    p.add_argument("--write", metavar="FILE", help="put the table into this Markdown file between --key's markers")
    p.add_argument("--key", help="the block's name: markers {} and {}".format(*markers("KEY")))
    a = p.parse_args()
    if a.write and not a.key:
        p.error("--write needs --key (the name in the file's <!-- KEY:begin --> line)")
    report = json.loads((Path(a.folder) / "compare.json").read_text())
    text = (means_table(report, a.decimals, cells=a.cells, arms=a.arms, against=a.against, wall=a.wall)
            if a.means else table(report, a.decimals, arms=a.arms))
    if a.write:
        write_block(Path(a.write), a.key, text)
    print(text)


if __name__ == "__main__":
    main()
