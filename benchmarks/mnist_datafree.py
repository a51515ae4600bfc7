"""Data-free distillation on MNIST under one wall-clock budget: LeNet-5 teacher -> LeNet-5-half, no real image.

Every method runs with its CPU recipe (``configs/mnist/<method>.yaml``) and with the authors' settings
(``configs/mnist/<method>_authors.yaml``) for ``--budget`` minutes (``train.time_budget_min``); the student is
kept every minute (``train.snapshot_min``) and those snapshots are scored on the test set after training, so
the table gives test accuracy at 5, 10, 15 and 20 minutes and the plot accuracy against time. DeepInversion
and FastDFKD invert a LeNet-5 with BatchNorm (``configs/mnist/teacher_lenet5_bn.yaml``), the others the plain
LeNet-5. FastDFKD has a CPU recipe only on MNIST (``--settings cpu``).
Nothing is tuned on the test set: the CPU recipes were chosen on a validation split carved from the
training set (see BENCHMARKS.md); these runs read no training image.

``--grid`` runs the robustness grid instead: RDSKD and DAFL over several hyperparameter settings (generator
learning rate, batch size, loss weights) at a shorter budget, one seed each.

    python benchmarks/mnist_datafree.py --teacher runs/mnist/teacher_lenet5/model.pt \\
        --teacher-bn runs/mnist/teacher_lenet5_bn/model.pt --seeds 0 1 2
    python benchmarks/mnist_datafree.py --grid --budget 5 --teacher runs/mnist/teacher_lenet5/model.pt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import REPO, machine, quiet_host, run

METHODS = ["rdskd", "dafl", "dfad", "deepinversion", "fast_dfkd"]
#: methods that read the teacher's BatchNorm statistics: they invert the LeNet-5 with BatchNorm (--teacher-bn)
NEEDS_BN = {"deepinversion", "fast_dfkd"}
SETTINGS = {"cpu": "configs/mnist/{m}.yaml", "authors": "configs/mnist/{m}_authors.yaml"}
MARKS = [5, 10, 15, 20]
#: the robustness grid: overrides of the CPU recipe, one setting per entry. Both methods get the same grid
#: relative to their recipe: generator learning rate over two decades around it (x0.1, x1, x10 for RDSKD, whose
#: recipe has 1e-2; x0.01, x0.1, x1 for DAFL, whose authors' 0.2 is already large for Adam) times batch 128 and 256.
#: DAFL also has loss weights (RDSKD has none: its exponential penalisation replaces them); its information-entropy
#: weight is varied separately and reported in its own line.
SHARED_AXES = ("method.generator_lr", "train.batch_size")
GRID = {
    "rdskd": [{"method.generator_lr": lr, "train.batch_size": b} for lr in (1e-3, 1e-2, 1e-1) for b in (128, 256)],
    "dafl": [*({"method.generator_lr": lr, "train.batch_size": b} for lr in (2e-3, 2e-2, 2e-1) for b in (128, 256)),
             *({"method.entropy_weight": w} for w in (1.0, 20.0))],
}


def overrides(a: argparse.Namespace, method: str, seed: int, budget: float) -> list[str]:
    teacher = a.teacher_bn if method in NEEDS_BN else a.teacher
    marks = ",".join(str(m) for m in range(1, int(budget) + 1))
    return [f"data.root={a.root}", f"teacher.checkpoint={teacher}", f"seed={seed}",
            f"train.time_budget_min={budget}", f"train.snapshot_min=[{marks}]"]


def measured(r: dict[str, Any]) -> dict[str, Any]:
    s = r.pop("summary")
    return r | {"snapshots": s.get("snapshots", []), "collapse_events": s.get("collapse_events", []),
                "final_diagnostics": s.get("final_diagnostics", {}), "train_time_s": s.get("train_time_s"),
                "stopped_by_time_budget": s.get("stopped_by_time_budget", False), "cpu_steal": s.get("cpu_steal"),
                "synthetic_images": s.get("synthetic_images"),
                "teacher_test_accuracy": s.get("teacher_test_accuracy")}


def at(runs: list[dict[str, Any]], minutes: float) -> list[float]:
    return [next(x["test_accuracy"] for x in r["snapshots"] if x["minutes"] == minutes) for r in runs
            if any(x["minutes"] == minutes for x in r["snapshots"])]


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} +- {100 * sd:.2f}"


def steal(runs: list[dict[str, Any]]) -> str:
    """The largest share of CPU time the host took from a run of the row (summary ``cpu_steal``; older runs
    did not record it): a timed row counts only from a quiet host."""
    seen = [r["cpu_steal"] for r in runs if r.get("cpu_steal") is not None]
    return f"{100 * max(seen):.0f}%" if seen else "not recorded"


def render(result: dict[str, Any]) -> str:
    lines = ["| method | settings | seeds | " + " | ".join(f"{m} min" for m in MARKS) +
             " | final | collapse warnings | CPU steal (most) |",
             "|---|---|---|" + "---|" * len(MARKS) + "---|---|---|"]
    for e in result.get("rows", {}).values():
        runs = e["runs"]
        finals = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
        collapses = sum(len(r["collapse_events"]) for r in runs)
        lines.append(f"| {e['method']} | {e['setting']} | {len(runs)} | " +
                     " | ".join(cell(at(runs, m)) for m in MARKS) +
                     f" | {cell(finals)} | {collapses} | {steal(runs)} |")
    paced = [e for e in result.get("rows", {}).values() if all(r.get("synthetic_images") for r in e["runs"])]
    if paced:  # what the compute bought: images per second of training, and in all
        lines += ["", "| method | settings | synthesised / s | distilled / s | distilled in all (M) |",
                  "|---|---|---|---|---|"]
        for e in paced:
            rate = {k: [r["synthetic_images"][k] / r["train_time_s"] for r in e["runs"]]
                    for k in ("synthesised", "distilled")}
            total = statistics.mean(r["synthetic_images"]["distilled"] for r in e["runs"]) / 1e6
            lines.append(f"| {e['method']} | {e['setting']} | {statistics.mean(rate['synthesised']):.0f} | "
                         f"{statistics.mean(rate['distilled']):.0f} | {total:.2f} |")
    grid = result.get("grid", {})
    if grid:
        lines += ["", "| method | setting | test accuracy |", "|---|---|---|"]
        for method, entries in grid.items():
            for g in entries:
                acc = g["run"]["test_accuracy"]
                shown = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in g["setting"].items())
                lines.append(f"| {method} | {shown} | {'diverged' if acc is None else f'{100 * acc:.2f}'} |")
            shared = [g for g in entries if set(g["setting"]) <= set(SHARED_AXES)]
            groups = [("learning rate x batch", shared)] + ([("all", entries)] if len(shared) < len(entries) else [])
            for label, group in groups:
                accs = [g["run"]["test_accuracy"] or 0.0 for g in group]  # a diverged run counts as 0
                lines.append(f"| **{method}** | **{label}: mean +- std (worst) over {len(accs)} settings** | "
                             f"**{cell(accs)} ({100 * min(accs):.2f})** |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for e in result["rows"].values():
        minutes = sorted({x["minutes"] for r in e["runs"] for x in r["snapshots"]})
        means = [100 * statistics.mean(at(e["runs"], m)) for m in minutes]
        ax.plot(minutes, means, marker=".", label=f"{e['method']} ({e['setting']})",
                linestyle="-" if e["setting"].startswith("cpu") else "--")
    ax.set_xlabel("minutes of training (2 CPU cores)")
    ax.set_ylabel("student test accuracy (%), mean over seeds")
    ax.set_title("Data-free KD on MNIST: LeNet-5 -> LeNet-5-half")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the curves fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="../shared/data/mnist")
    p.add_argument("--teacher", required=True, help="LeNet-5 model.pt (configs/mnist/teacher_lenet5.yaml)")
    p.add_argument("--teacher-bn", help="LeNet-5 with BatchNorm model.pt, for deepinversion")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=20.0, help="minutes per run")
    p.add_argument("--grid", action="store_true", help="run the robustness grid (RDSKD and DAFL) instead")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="extra",
                   help="extra overrides for these runs, e.g. method.generator_epochs=1 (needs --label)")
    p.add_argument("--label", help="row label for runs with --set, e.g. 'authors, 5 min generator'")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mnist_datafree.json"))
    p.add_argument("--runs", default="runs/bench-datafree")
    p.add_argument("--render", action="store_true", help="print the tables (and redraw the plot) and exit")
    p.add_argument("--max-steal", type=float, default=None, metavar="FRACTION",
                   help="timed runs only from a quiet host: before each run wait until the CPU steal is at most "
                        "this (e.g. 0.05), and run a seed again (at most --retries times) when the host took "
                        "more during it; the runs set aside are kept under 'set_aside' with their steal")
    p.add_argument("--retries", type=int, default=2)
    a = p.parse_args()
    out = Path(a.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {
        "benchmark": "mnist_datafree", "machine": machine(), "rows": {}, "grid": {}}
    if a.render:
        print(render(result))
        if result["rows"]:
            plot(result, out.with_suffix(".png"))
        return
    if a.extra and not a.label:
        p.error("--set changes the recipe: give the rows a --label")
    bn = sorted(NEEDS_BN & set(a.methods))
    if bn and not a.grid and a.teacher_bn is None:
        p.error(f"{', '.join(bn)} needs --teacher-bn (a LeNet-5 with BatchNorm)")
    recipes = [SETTINGS[st].format(m=m) for m in a.methods for st in a.settings]
    missing = [r for r in recipes if not (REPO / r).is_file()]
    if missing and not a.grid:
        p.error(f"no recipe {', '.join(missing)}: leave that setting out (--settings cpu)")
    base = REPO / a.runs / time.strftime("%Y%m%d-%H%M%S")
    result.setdefault("dates", []).append(time.strftime("%Y-%m-%d %H:%M"))
    if a.grid:
        for method, settings in GRID.items():
            if method not in a.methods:
                continue
            done = result["grid"].setdefault(method, [])
            for i, setting in enumerate(settings):
                if any(g["setting"] == setting for g in done):
                    continue
                ov = [*overrides(a, method, a.seeds[0], a.budget), *(f"{k}={v}" for k, v in setting.items())]
                r = measured(run("distill", SETTINGS["cpu"].format(m=method), ov, base / f"grid-{method}-{i}"))
                done.append({"setting": setting, "budget_min": a.budget, "run": r})
                print(f"[grid] {method} {setting}: test {r['test_accuracy']}", flush=True)
                out.write_text(json.dumps(result, indent=2) + "\n")
    else:
        for method in a.methods:
            for setting in a.settings:
                shown = f"{setting}: {a.label}" if a.label else setting
                key = f"{method}/{shown}"
                e = result["rows"].setdefault(key, {"method": method, "setting": shown, "budget_min": a.budget,
                                                    "overrides": a.extra, "runs": []})
                for seed in a.seeds:
                    if any(r["seed"] == seed for r in e["runs"]):
                        continue
                    for attempt in range(a.retries + 1):
                        if a.max_steal is not None:
                            quiet_host(a.max_steal)
                        r = measured(run("distill", SETTINGS[setting].format(m=method),
                                         [*overrides(a, method, seed, a.budget), *a.extra],
                                         base / (f"{method}-{setting}-s{seed}" + (f"-{attempt}" if attempt else ""))))
                        noisy = a.max_steal is not None and (r.get("cpu_steal") or 0.0) > a.max_steal
                        if not noisy or attempt == a.retries:
                            break
                        e.setdefault("set_aside", []).append(r)  # the host, not the method, decided its time
                        print(f"[{key}] seed {seed}: set aside, the host took {steal([r])} of the CPU "
                              f"(test {r['test_accuracy']})", flush=True)
                    e["runs"].append(r)
                    print(f"[{key}] seed {seed}: test {r['test_accuracy']} after {r['train_time_s']} s "
                          f"(CPU steal {steal([r])})", flush=True)
                    out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out.with_suffix(".png"))
    print(render(result))


if __name__ == "__main__":
    main()
