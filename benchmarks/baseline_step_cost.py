"""Step time of each baseline of issue 23 relative to KD's, on the Fashion-MNIST CPU protocol.

Every recipe of ``configs/fashion-mnist/`` (and the seeds' adaptive and TH-KD recipes pointed at Fashion-MNIST)
is built as ``kdkit distill`` builds it and stepped through the real engine (forward, losses, backward,
optimizer step) on the same 8 pre-made batches of 128 images, the methods alternating step by step so that
drift in the machine's speed affects all alike; the student alone (``supervised``) is timed in the same
rotation. No teacher cache. Run it on an otherwise idle machine, with the teacher of the comparison:

    python benchmarks/baseline_step_cost.py --teacher runs/teachers/fashion-mnist_lenet5/model.pt \\
        --root ../shared/data/fashion-mnist --steps 200 > benchmarks/results/baseline_step_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import build, median_step_ms

from kdkit.config import load_config
from kdkit.data import load_data

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {name: f"configs/fashion-mnist/{name}.yaml"
           for name in ("kd", "kd_ls", "dkd", "dist", "crd", "reviewkd", "rkd", "sp", "pkt")}
RECIPES.update(adaptive="configs/mnist/adaptive_fulllabel.yaml", th_kd="configs/mnist/th_kd_fulllabel.yaml")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher's model.pt")
    p.add_argument("--root", required=True, help="the Fashion-MNIST idx files")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    common = [f"teacher.checkpoint={a.teacher}", "data.name=fashion-mnist", f"data.root={a.root}",
              "train.progress=none"]
    kd_recipe = str(ROOT / RECIPES["kd"])
    data = load_data(replace(load_config(kd_recipe, common).data))
    variants = {"student alone": build(["method.name=supervised"], data, common, kd_recipe)}
    variants.update({name: build([], data, common, str(ROOT / path)) for name, path in RECIPES.items()})
    med = median_step_ms(variants, a.steps, warmup=10)
    rows = {k: {"median_step_ms": round(v, 2), "relative_to_kd": round(v / med["kd"], 3),
                "relative_to_student_step": round(v / med["student alone"], 3)} for k, v in med.items()}
    print(json.dumps({"student": "lenet5_half", "teacher": a.teacher, "batch_size": 128, "steps": a.steps,
                      "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
