"""Tune a recipe on validation only: one run with a validation split carved from the training set, printing
and recording its validation accuracy. The test accuracy is never printed or recorded, so choosing settings
with this script cannot select on the test set.

    python benchmarks/tune_on_validation.py configs/mnist/rdskd.yaml NAME [key=value ...]

Appends a line to benchmarks/results/tuning.jsonl (name, recipe, overrides, validation accuracy per epoch,
training time). For data-free methods the training images other than the validation split are never used.
"""

from __future__ import annotations

import json
import sys
import time

from common import REPO, machine

from kdkit.config import load_config
from kdkit.run import execute


def main() -> None:
    if len(sys.argv) < 3:
        print(__doc__)
        raise SystemExit(2)
    recipe, name, *ov = sys.argv[1:]
    fixed = ["data.root=../shared/data/mnist", "data.val_split=5000", "train.select=last", "train.eval_every=1",
             f"output_dir=runs/tuning/{name}-{time.strftime('%Y%m%d-%H%M%S')}", "train.progress=lines"]
    cfg = load_config(REPO / recipe, [*fixed, *ov])
    s = execute(cfg, "distill").summary
    with open(f"{cfg.output_dir}/metrics.jsonl", encoding="utf-8") as f:
        lines = [json.loads(x) for x in f]
    curve = [round(x["val/accuracy"], 4) for x in lines if x.get("event") == "epoch" and "val/accuracy" in x]
    rec = {"name": name, "recipe": recipe, "overrides": ov, "val_accuracy": s["val_accuracy"], "val_curve": curve,
           "train_time_s": s["train_time_s"], "collapse_events": len(s.get("collapse_events", [])),
           "date": time.strftime("%Y-%m-%d"), "machine": machine()["cpu"]}
    print(json.dumps({k: rec[k] for k in ("name", "val_accuracy", "train_time_s", "overrides")}), flush=True)
    with open(REPO / "benchmarks" / "results" / "tuning.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
