"""Time one training step of two distillation methods on the same teacher, student and batch.

Both methods are built exactly as ``kdkit distill`` builds them and their steps run through the real
engine (``Engine._step``: forward, loss, backward, optimizer step), alternating between the two so
that drift in the machine's speed affects both alike. Prints JSON with the median step times and ratio.

    python benchmarks/step_time.py --teacher runs/.../teacher/model.pt --data mnist --root ../shared/data/mnist \
        --student lenet5_half --batch-size 64 --steps 200 \
        --a method.name=kd --b method.name=adaptive \
        'method.paths=[soft_target, logits, hint, attention, gram, feature_map, softmax_regression]'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from kdkit.config import load_config
from kdkit.data import BatchLoader, load_data
from kdkit.engine import DistInfo, Engine
from kdkit.methods import method_class
from kdkit.modelfile import build_from_config


def build(overrides: list[str], data, common: list[str], recipe: str | None = None):
    cfg = load_config(recipe, [*common, *overrides])
    teacher = build_from_config(cfg.teacher, data.info, "teacher").model
    student = build_from_config(cfg.student, data.info, "student").model
    method = method_class(cfg.method.name)(cfg.method.options, student=student, teacher=teacher, info=data.info,
                                           train=cfg.train)
    loader = BatchLoader(data.train, cfg.train.batch_size, shuffle=True, drop_last=True, mean=data.info.mean,
                         std=data.info.std)
    batches = list(loader)[:8]
    method.data = data  # as kdkit distill gives it (CRD sizes its memory from the training set)
    method.setup(batches[0])
    engine = Engine(method, data, cfg, run_dir=None, dist=DistInfo(), device=torch.device("cpu"))
    stage = method.stages()[0]
    engine._set_trainable(stage)
    state = engine._stage_state(stage, len(loader), None)
    stepper = engine._stepper(stage)
    return cfg, engine, stage, state, stepper, batches


def median_step_ms(runs: dict, steps: int, warmup: int = 20, extra: dict | None = None) -> dict[str, float]:
    """Median milliseconds per training step of each built variant (see :func:`build`), the variants alternating
    step by step on their batches; `extra` adds named callables of the batch, timed in the same rotation."""
    times: dict[str, list[float]] = {k: [] for k in [*runs, *(extra or {})]}
    for i in range(steps + warmup):
        for key, (_, engine, stage, state, stepper, batches) in runs.items():
            batch = batches[i % len(batches)]
            t = time.perf_counter()
            engine._step(stepper, stage, state, batch, (0, 0, i))
            if i >= warmup:  # warm-up excluded
                times[key].append(time.perf_counter() - t)
        for key, fn in (extra or {}).items():
            first = next(iter(runs.values()))[5]
            batch = first[i % len(first)]
            t = time.perf_counter()
            fn(batch)
            if i >= warmup:
                times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", default="lenet5_half")
    p.add_argument("--data", default="mnist")
    p.add_argument("--root", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--a", nargs="+", default=["method.name=kd"])
    p.add_argument("--b", nargs="+", required=True)
    a = p.parse_args()
    common = [f"teacher.checkpoint={a.teacher}", f"student.arch={a.student}", f"data.name={a.data}",
              f"train.batch_size={a.batch_size}", "data.val_split=0", "train.progress=none"]
    if a.root:
        common.append(f"data.root={a.root}")
    if a.image_size:
        common.append(f"data.image_size={a.image_size}")
    cfg0 = load_config(None, common)
    data = load_data(replace(cfg0.data))
    runs = {"a": build(a.a, data, common), "b": build(a.b, data, common)}
    med = median_step_ms(runs, a.steps)
    print(json.dumps({"a": a.a, "b": a.b, "batch_size": a.batch_size, "steps": a.steps,
                      "threads": torch.get_num_threads(), "median_step_ms_a": round(med["a"], 3),
                      "median_step_ms_b": round(med["b"], 3), "ratio_b_over_a": round(med["b"] / med["a"], 3)}))


if __name__ == "__main__":
    main()
