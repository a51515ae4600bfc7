"""Step time of every distillation arm of one cell of a comparison, relative to KD's and to the student alone's.

Each arm is built from exactly the command line `kdkit compare` gives it (its recipe and `set` overrides, seed 0
of the cell), as ``kdkit distill`` builds it, and stepped through the real engine (forward, losses, backward,
optimizer step) on the same 8 pre-made batches of the recipe's batch size, the arms alternating step by step so
that drift in the machine's speed affects all alike. The student alone is the KD arm with
``method.name=supervised`` (the student's forward and backward with cross-entropy only), timed in the same
rotation. No teacher cache (a cache would hide the teacher's forward pass, which every method here pays when its
images are augmented). Run it from the folder the comparison runs in (the teachers' paths are relative to it), on
an otherwise idle machine; for issue 23 (the baselines on resnet20 -> resnet8, Fashion-MNIST, all labels):

    python benchmarks/baseline_step_cost.py benchmarks/compare/resnet.yaml --cell data=fashion-mnist,labels=all \\
        --steps 200 --threads 2 > benchmarks/results/baseline_step_cost.json
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

from kdkit.compare import load_spec, plan
from kdkit.config import load_config
from kdkit.data import load_data


def arm_commands(spec_file: str, cell: str) -> dict[str, list[str]]:
    """arm -> [recipe, overrides...] of the cell's seed-0 run, for every distillation arm of the cell."""
    planned = plan(load_spec(spec_file))
    runs = [r for r in planned if r.cell == cell and r.seed == 0 and r.command == "distill"]
    if not runs:
        cells = sorted({r.cell for r in planned if r.seed is not None})
        raise SystemExit(f"no distillation arm runs in cell {cell!r} of {spec_file}; its cells: {cells}")
    # the thread count is this script's to set; the recipes' progress bars would only slow the timing
    return {r.arm: [a for a in r.argv if not a.startswith(("train.threads=", "seed="))] + ["train.progress=none"]
            for r in runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="a comparison spec (benchmarks/compare/*.yaml)")
    p.add_argument("--cell", required=True, help="the cell, as the comparison names it (data=fashion-mnist,...)")
    p.add_argument("--baseline", default="kd", help="the arm the others are divided by (default kd)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    commands = arm_commands(a.spec, a.cell)
    if a.baseline not in commands:
        raise SystemExit(f"--baseline {a.baseline!r} is not a distillation arm of the cell: {sorted(commands)}")
    base = commands[a.baseline]
    data = load_data(replace(load_config(base[0], base[1:]).data))
    variants = {"student alone": build([*base[1:], "method.name=supervised"], data, [], base[0])}
    variants.update({arm: build(argv[1:], data, [], argv[0]) for arm, argv in commands.items()})
    med = median_step_ms(variants, a.steps, warmup=10)
    rows = {k: {"median_step_ms": round(v, 2), f"relative_to_{a.baseline}": round(v / med[a.baseline], 3),
                "relative_to_student_step": round(v / med["student alone"], 3)} for k, v in med.items()}
    print(json.dumps({"spec": a.spec, "cell": a.cell, "commands": commands, "steps": a.steps,
                      "batch_size": variants[a.baseline][0].train.batch_size, "threads": torch.get_num_threads(),
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
