"""Why does KD help one cell of a comparison and not another? The student alone's fit gap beside KD's gain.

KD's soft targets act on a student as a regulariser and as a richer target; a student that already fits its
validation images as well as its training images (no over-fitting to remove) and sits close to its teacher has
little to gain. For every cell of the given comparisons (archived `kdkit compare` folders) this prints:

- the teacher's test accuracy, and its accuracy on every training image (`kdkit.evaluate(split="train")`: how
  well the soft targets it gives on the training images fit their labels);
- the student alone's test accuracy (mean over seeds) and the teacher - student gap;
- the student alone's last-epoch training cross-entropy (the mean over that epoch's augmented batches, as
  logged in metrics.jsonl) and validation loss (clean validation images), and their difference: the fit gap;
- KD - alone, the paired difference of test accuracy with its 95% interval (from compare.json).

    python benchmarks/fit_gap.py benchmarks/results/compare/fulllabel-lenet:kd_t2_half \\
        benchmarks/results/compare/lowlabel-lenet:kd [--write BENCHMARKS.md --key fit-gap]

Each argument is FOLDER:KD_ARM; the student alone is the arm `alone`, the teacher the `prepare` run whose
output folder the KD arm's `teacher.checkpoint` names (its model.pt is in the archive).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from marked_block import write_block  # noqa: E402

import kdkit  # noqa: E402
from kdkit.report import read_metrics  # noqa: E402
from kdkit.stats import mean_ci  # noqa: E402


def _last_epoch(run_dir: Path) -> dict:
    """The last `epoch` event of a run's metrics.jsonl."""
    epochs = [e for e in read_metrics(run_dir) if e.get("event") == "epoch"]
    if not epochs:
        raise SystemExit(f"{run_dir}/metrics.jsonl: no epoch event")
    return epochs[-1]


def _teacher_dir(folder: Path, cell: str, kd_arm: str) -> Path:
    """The archived prepare run whose output folder the KD arm's teacher.checkpoint names."""
    runs = sorted((folder / cell / kd_arm).glob("seed*/config.yaml"))
    if not runs:
        raise SystemExit(f"{folder / cell / kd_arm}: no run of arm {kd_arm}")
    wanted = Path(yaml.safe_load(runs[0].read_text())["teacher"]["checkpoint"]).parent
    for prep in sorted((folder / "prepare").glob("*/config.yaml")):
        if Path(yaml.safe_load(prep.read_text())["output_dir"]) == wanted:
            return prep.parent
    raise SystemExit(f"{folder}/prepare: no run made {wanted} (the teacher of {cell}/{kd_arm})")


def cell_row(folder: Path, cell: str, kd_arm: str, report: dict) -> dict:
    """The figures of one cell (see the module docstring)."""
    teacher = _teacher_dir(folder, cell, kd_arm)
    on_train = kdkit.evaluate(teacher, split="train")
    alone = sorted(m.parent for m in (folder / cell / "alone").glob("seed*/metrics.jsonl"))
    ends = [_last_epoch(d) for d in alone]
    train_ce = mean_ci([e["train/ce"] for e in ends])
    val_loss = mean_ci([e["val/loss"] for e in ends])
    gap = mean_ci([e["val/loss"] - e["train/ce"] for e in ends])
    arms = report["cells"][cell]["arms"]
    pair = next(p for p in report["cells"][cell]["pairs"] if p["arm"] == kd_arm and p["against"] == "alone")
    alone_test = mean_ci(list(arms["alone"]["per_seed"].values()))
    return {"comparison": folder.name, "cell": cell, "kd_arm": kd_arm, "seeds_alone": len(ends),
            "teacher_test": json.loads((teacher / "summary.json").read_text())["test_accuracy"],
            "teacher_train": on_train["accuracy"], "teacher_train_images": on_train["count"],
            "alone_test": alone_test.mean, "alone_train_ce": train_ce.mean, "alone_val_loss": val_loss.mean,
            "fit_gap": gap.mean, "fit_gap_half_width": gap.half_width, "kd_minus_alone": pair["diff"],
            "kd_seeds": pair["diff"]["n"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| comparison | cell | teacher test | teacher on every training image | student alone test | "
             "teacher - alone | alone: train CE | alone: val loss | fit gap (val - train) | KD arm | "
             "KD - alone [95%] | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["kd_minus_alone"]
        lines.append(
            f"| {r['comparison']} | {r['cell']} | {100 * r['teacher_test']:.2f} | {100 * r['teacher_train']:.2f} "
            f"({r['teacher_train_images']:,}) | {100 * r['alone_test']:.2f} | "
            f"{100 * (r['teacher_test'] - r['alone_test']):+.2f} | {r['alone_train_ce']:.3f} | "
            f"{r['alone_val_loss']:.3f} | {r['fit_gap']:+.3f} +- {r['fit_gap_half_width']:.3f} | {r['kd_arm']} | "
            f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] | {r['kd_seeds']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("comparisons", nargs="+", metavar="FOLDER:KD_ARM")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--write", type=Path, help="replace the marked block --key of this Markdown file")
    ap.add_argument("--key", default="fit-gap")
    args = ap.parse_args()
    rows = []
    for item in args.comparisons:
        folder, _, kd_arm = item.rpartition(":")
        folder = Path(folder)
        report = json.loads((folder / "compare.json").read_text())
        rows += [cell_row(folder, cell, kd_arm, report) for cell in report["cells"]]
    text = markdown(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.write:
        write_block(args.write, args.key, text)
    print(text)


if __name__ == "__main__":
    main()
