"""MNIST LeNet-5 teacher -> LeNet-5-half student: teacher, student alone, vanilla KD, over seeds.

Every run goes through the real command line (``kdkit train`` / ``kdkit distill`` with the recipes in
``configs/mnist/``), so each row of the results can be reproduced by the command stored next to it.

    python benchmarks/mnist_lenet.py --root ../shared/data/mnist --seeds 0 1 2

Writes ``benchmarks/results/mnist_lenet.json``. Model selection uses the validation split (5,000 images
carved from the training set); the test set is only evaluated once, at the end of each run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, machine

HERE = Path(__file__).resolve().parent


def run(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "kdkit", *args]
    shown = "kdkit " + " ".join(shlex.quote(a) for a in args)
    print(f"$ {shown}", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {shown}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((Path(out["run_dir"]) / "summary.json").read_text())
    row = {"command": shown, "seed": summary["seed"], "test_accuracy": summary["test_accuracy"],
           "val_accuracy": summary["val_accuracy"], "params": summary["params"],
           "wall_time_s": round(time.time() - t, 1), "train_time_s": summary["train_time_s"],
           "selected_epoch": summary["stages"][-1]["selected_epoch"], "run_dir": out["run_dir"]}
    if "teacher_test_accuracy" in summary:
        row["teacher_test_accuracy"] = summary["teacher_test_accuracy"]
    print(f"  test {100 * row['test_accuracy']:.2f}%  ({row['wall_time_s']:.0f}s)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="../shared/data/mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(HERE / "results" / "mnist_lenet.json"))
    p.add_argument("--runs", default="runs/bench-mnist", help="folder for the run directories")
    a = p.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{a.runs}/{stamp}"
    data = f"data.root={a.root}"
    teacher = run(["train", "configs/mnist/teacher_lenet5.yaml", data, f"output_dir={base}/teacher"])
    ckpt = f"{teacher['run_dir']}/model.pt"
    rows = {"teacher": [teacher], "student": [], "kd": []}
    for s in a.seeds:
        rows["student"].append(run(["train", "configs/mnist/student_lenet5_half.yaml", data, f"seed={s}",
                                    f"output_dir={base}/student-s{s}"]))
        rows["kd"].append(run(["distill", "configs/mnist/kd.yaml", data, f"seed={s}", f"teacher.checkpoint={ckpt}",
                               f"output_dir={base}/kd-s{s}"]))
    stats = {}
    for k, rs in rows.items():
        accs = [r["test_accuracy"] for r in rs]
        stats[k] = {"mean": statistics.mean(accs), "std": statistics.pstdev(accs), "min": min(accs),
                    "max": max(accs), "n": len(accs)}
    result = {"benchmark": "mnist_lenet", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "seeds": a.seeds, "runs": rows, "stats": stats}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, s in stats.items():
        print(f"{k:8s} test {100 * s['mean']:.2f}% +- {100 * s['std']:.2f} (min {100 * s['min']:.2f}, n={s['n']})")


if __name__ == "__main__":
    main()
