"""``kdkit demo`` / ``make demo``: the main job on the bundled digits data, in a couple of minutes.

Trains a LeNet-5 teacher, a LeNet-5-half student alone, then distills the student with KD, using the
recipes in ``configs/digits/``, and prints a table: test accuracy, parameters and CPU latency per image
(median over repeated calls, at batch 1 and batch 64).
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import load_config
from .measure import latency_ms
from .run import RunResult, execute

RECIPES = Path(__file__).resolve().parent / "recipes" / "digits"


def _run(recipe: str, command: str, out: Path, epochs: int | None, *extra: str) -> RunResult:
    overrides = [f"output_dir={out}", *extra]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    cfg = load_config(RECIPES / recipe, [*overrides, "train.progress=none"],
                      default_method="supervised" if command == "train" else "kd")
    print(f"kdkit {command} configs/digits/{recipe} {' '.join(overrides)}", flush=True)
    r = execute(cfg, command)
    print(f"  {cfg.train.epochs} epochs: test accuracy {100 * r.summary['test_accuracy']:.2f}% "
          f"(validation {100 * r.summary['val_accuracy']:.2f}%), {r.summary['wall_time_s']:.0f}s", flush=True)
    return r


def run_demo(output_dir: str | None = None, epochs: int | None = None) -> list[dict]:
    t0 = time.time()
    base = Path(output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    teacher = _run("teacher_lenet5.yaml", "train", base / "teacher", epochs)
    student = _run("student_lenet5_half.yaml", "train", base / "student", epochs)
    kd = _run("kd.yaml", "distill", base / "kd", epochs, f"teacher.checkpoint={base / 'teacher' / 'model.pt'}")
    rows = []
    for label, r in (("teacher (LeNet-5)", teacher), ("student alone (LeNet-5-half)", student),
                     ("student with KD", kd)):
        shape = tuple(r.summary["data"]["input_shape"])
        rows.append({"run": label, "test_accuracy": r.summary["test_accuracy"], "params": r.summary["params"],
                     "latency_ms": latency_ms(r.model.cpu(), shape, batch=1),
                     "latency_ms_b64": latency_ms(r.model.cpu(), shape, batch=64, repeats=20),
                     "run_dir": str(r.run_dir)})
    print(f"\nkdkit demo: digits ({teacher.summary['data']['test']} test images), {time.time() - t0:.0f}s in all\n")
    print(f"| {'model':<28} | {'test accuracy':>13} | {'parameters':>10} | {'ms/image, batch 1':>17} | "
          f"{'ms/image, batch 64':>18} |")
    print(f"|{'-' * 30}|{'-' * 14}:|{'-' * 11}:|{'-' * 18}:|{'-' * 19}:|")
    for r in rows:
        print(f"| {r['run']:<28} | {100 * r['test_accuracy']:>12.2f}% | {r['params']:>10,} | "
              f"{r['latency_ms']:>17.3f} | {r['latency_ms_b64']:>18.4f} |")
    print(f"\nruns in {base}/ (teacher, student, kd): config.yaml, metrics.jsonl, summary.json, model.pt")
    return rows
