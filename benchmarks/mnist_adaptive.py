"""Low-label MNIST benchmark of adaptive multi-path distillation (one command for every row).

The LeNet-5 teacher (two or more convolutional stages) is trained on all of MNIST; LeNet-5-half students
see 100 labeled images per class (seeded; a 1,000-image validation split is carved first) and the
teacher's knowledge on those images. Rows, each over the given seeds:

* the student alone (cross-entropy);
* each single path (+ cross-entropy): soft_target, logits, hint, attention, gram, feature_map,
  softmax_regression;
* all seven paths with equal, fixed, uncertainty (the paper's rule), GradNorm and DWA weighting.

The fixed weights are tuned on the validation split only, by coordinate search from equal weights (seed
0; each path in turn tries the weights 0, 0.01, 0.1, 1, 10 and keeps the best validation accuracy).
Runs go through the same code path as ``kdkit train|distill`` (``kdkit.run.execute``); each row
records its equivalent command. Both the recipe's optimizer (Adam) and SGD are reported.

    python benchmarks/mnist_adaptive.py --root ../shared/data/mnist --seeds 0 1 2

Writes ``benchmarks/results/mnist_adaptive.json`` and prints the tables.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, aggregate, low_label_parser, machine, pct
from common import run as run_one

HERE = Path(__file__).resolve().parent

PATHS = ["soft_target", "logits", "hint", "attention", "gram", "feature_map", "softmax_regression"]
ALL = "[" + ", ".join(PATHS) + "]"
OPTIMIZERS = {
    "adam": [],  # the recipes' own (Adam, lr 1e-3)
    "sgd": ["train.optimizer=sgd", "train.lr=0.02", "train.momentum=0.9", "train.nesterov=true",
            "train.weight_decay=0.0005"],
}
CANDIDATES = [0.0, 0.01, 0.1, 1.0, 10.0]


def paths_arg(weights: dict[str, float]) -> str:
    return "[" + ", ".join(f"{{name: {p}, weight: {w:g}}}" for p, w in weights.items()) + "]"


def run(command: str, recipe: str, overrides: list[str], out: Path) -> dict:
    r = run_one(command, recipe, overrides, out)
    s = r.pop("summary")
    return r | {"final_weights": s.get("final_weights", {}),
                "selected_epoch": s["stages"][-1]["selected_epoch"] if s else None}


def tune_fixed(base: list[str], out: Path, log: list) -> dict[str, float]:
    """Coordinate search of the fixed weights on validation accuracy (seed 0)."""
    weights = {p: 1.0 for p in PATHS}
    cache: dict[tuple, float] = {}

    def score(w: dict[str, float]) -> float:
        key = tuple(w.values())
        if key not in cache:
            r = run("distill", "configs/mnist/adaptive.yaml",
                    [*base, "method.weighting=fixed", f"method.paths={paths_arg(w)}", "seed=0"],
                    out / f"tune-{len(cache)}")
            cache[key] = -1.0 if r["val_accuracy"] is None else r["val_accuracy"]  # diverged: the worst
            log.append({"weights": dict(w), "val_accuracy": r["val_accuracy"], "diverged": r.get("diverged")})
            print(f"  tune {w} -> val {pct(r['val_accuracy'])}", flush=True)
        return cache[key]

    best = score(weights)
    for p in PATHS:
        for c in CANDIDATES:
            trial = {**weights, p: c}
            if all(v == 0 for v in trial.values()):
                continue
            v = score(trial)
            if v > best:
                best, weights = v, trial
    return weights


def step_ratio(teacher: str, root: str) -> dict:
    cmd = [sys.executable, str(HERE / "step_time.py"), "--teacher", teacher, "--root", root, "--steps", "300",
           "--batch-size", "64", "--b", "method.name=adaptive", f"method.paths={ALL}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1]) | {"command": " ".join(cmd[1:])}


def render(result: dict) -> str:
    """The results as the markdown tables of BENCHMARKS.md."""
    lines = []
    for opt, t in result["tables"].items():
        lines += [f"**{opt}**", "",
                  "| row | test accuracy (mean +- std) | per seed | validation (mean) | wall time per run |",
                  "|---|---|---|---|---|"]
        for name, r in t["rows"].items():
            per = ", ".join(pct(x["test_accuracy"]) for x in r["runs"])
            div = f" ({r['diverged']} of {len(r['runs'])} diverged)" if r.get("diverged") else ""
            lines.append(f"| {name} | {pct(r['mean'], r['std'])}{div} | {per} | "
                         f"{pct(r['val_mean'])} | {r['wall_time_s']:.0f} s |")
        lines += ["", f"Fixed weights tuned on validation: {t['fixed_weights']}", ""]
        for name in ("all paths, uncertainty", "all paths, gradnorm", "all paths, dwa"):
            finals = [x["final_weights"] for x in t["rows"][name]["runs"] if x["final_weights"]]
            if not finals:
                continue
            mean = {k.split("/", 1)[1]: statistics.mean(f[k] for f in finals) for k in finals[0]}
            lines.append(f"- final weights, {name} (mean over seeds): "
                         + ", ".join(f"{k} {v:.3g}" for k, v in mean.items()))
        lines.append("")
    if "step_time" in result:
        s = result["step_time"]
        lines.append(f"Step time, all seven paths (uncertainty) / KD, batch {s['batch_size']}: "
                     f"{s['median_step_ms_b']} ms / {s['median_step_ms_a']} ms = {s['ratio_b_over_a']}x")
    return "\n".join(lines)


def main() -> None:
    p = low_label_parser(__doc__, "mnist_adaptive", "runs/bench-adaptive")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    a = p.parse_args()
    if a.render:
        print(render(json.loads(Path(a.out).read_text())))
        return
    base_dir = REPO / a.runs / time.strftime("%Y%m%d-%H%M%S")
    data = f"data.root={a.root}"
    teacher = a.teacher
    result: dict = {"benchmark": "mnist_adaptive", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                    "seeds": a.seeds, "tables": {}}
    if Path(a.out).is_file() and set(a.optimizers) != set(OPTIMIZERS):  # add to the tables already measured
        result["tables"] = json.loads(Path(a.out).read_text()).get("tables", {})
    if teacher is None:
        r = run("train", "configs/mnist/teacher_lenet5.yaml", [data], base_dir / "teacher")
        result["teacher"] = r
        teacher = str(base_dir / "teacher" / "model.pt")
    result["teacher_checkpoint"] = teacher
    for opt in a.optimizers:
        base = [data, *OPTIMIZERS[opt]]
        kd = [*base, f"teacher.checkpoint={teacher}"]
        out = base_dir / opt
        tuning: list = []
        print(f"[{opt}] tuning fixed weights on validation", flush=True)
        fixed = tune_fixed(kd, out, tuning)
        rows: dict[str, tuple[str, str, list[str]]] = {
            "student alone": ("train", "configs/mnist/lowlabel_student.yaml", base)}
        for path in PATHS:
            rows[f"path: {path}"] = ("distill", "configs/mnist/adaptive.yaml",
                                     [*kd, "method.weighting=equal", f"method.paths=[{path}]"])
        for w in ("equal", "fixed", "uncertainty", "gradnorm", "dwa"):
            paths = paths_arg(fixed) if w == "fixed" else ALL
            rows[f"all paths, {w}"] = ("distill", "configs/mnist/adaptive.yaml",
                                       [*kd, f"method.weighting={w}", f"method.paths={paths}"])
        table = {}
        for name, (cmd, recipe, ov) in rows.items():
            runs = []
            for s in a.seeds:
                slug = name.replace(": ", "-").replace(", ", "-").replace(" ", "_")
                runs.append(run(cmd, recipe, [*ov, f"seed={s}"], out / f"{slug}-s{s}"))
            agg = aggregate(runs)
            table[name] = {**agg, "val_mean": aggregate(runs, "val_accuracy")["mean"],
                           "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs), "runs": runs}
            print(f"[{opt}] {name:32s} test {pct(agg['mean'], agg['std'])} ({agg['diverged']} diverged)  "
                  f"val {pct(table[name]['val_mean'])}  {table[name]['wall_time_s']:.0f}s/run", flush=True)
        result["tables"][opt] = {"fixed_weights": fixed, "tuning": tuning, "rows": table}
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    result["step_time"] = step_ratio(teacher, a.root)
    print(f"step time, adaptive (7 paths) / KD: {result['step_time']['ratio_b_over_a']}x", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
