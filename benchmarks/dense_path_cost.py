"""Step-time cost of each dense distillation path, relative to the student's own training step (issue 20).

Every variant is built as ``kdkit distill`` builds it and stepped through the real engine (forward, losses,
backward, optimizer step) on the same pre-made batches of mnist-scenes, the variants alternating step by step
so that drift in the machine's speed affects all alike: the student alone (``supervised``), then ``adaptive``
with one path at a time (equal weighting, CE beside it). A distillation step also runs the teacher forward
(no teacher cache here), which is timed on its own too. Run it on an otherwise idle machine:

    python benchmarks/dense_path_cost.py --teacher runs/teachers/scenes_deeplab_resnet20/model.pt \\
        --root ../shared/data/mnist --steps 100 > benchmarks/results/dense_path_cost.json
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

PATHS = {
    "soft_target": "[soft_target]",
    "logits": "[logits]",
    "cwd": "[cwd]",
    "pairwise (last stage)": "[{name: pairwise, pairs: [[head, head]]}]",
    "attention (every stage)": "[attention]",
    "hint (every stage)": "[hint]",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", default="deeplab_resnet8")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--root", required=True)
    p.add_argument("--scenes-folder", default="runs/scenes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    common = [f"teacher.checkpoint={a.teacher}", f"student.arch={a.student}", f"student.width={a.width}",
              "data.name=mnist-scenes", f"data.root={a.root}", f"data.scenes.folder={a.scenes_folder}",
              f"train.batch_size={a.batch_size}", "data.val_split=0", "train.progress=none"]
    data = load_data(replace(load_config(None, common).data))
    variants = {"student alone": build(["method.name=supervised"], data, common)}
    for name, paths in PATHS.items():
        variants[name] = build(["method.name=adaptive", f"method.paths={paths}", "method.weighting=equal",
                                "method.resize=true"], data, common)
    teacher = variants["soft_target"][1].method.teacher

    def teacher_forward(batch) -> None:
        with torch.no_grad():
            teacher(batch.x)

    med = median_step_ms(variants, a.steps, warmup=10, extra={"teacher forward": teacher_forward})
    base, tf = med["student alone"], med["teacher forward"]
    rows = {k: {"median_step_ms": round(v, 2), "relative_to_student_step": round(v / base, 3),
                "path_only_relative": None if k in ("student alone", "teacher forward") else
                round((v - base - tf) / base, 3)} for k, v in med.items()}
    print(json.dumps({"student": f"{a.student} width {a.width}", "teacher": a.teacher, "batch_size": a.batch_size,
                      "steps": a.steps, "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
