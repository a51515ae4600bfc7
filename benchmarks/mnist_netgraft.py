"""Few-shot MNIST benchmark of progressive network grafting (Shen et al., AAAI 2021), one command.

Two teachers from the zoo trained on all of MNIST (vgg8_bn at width 0.25 and resnet8), N = 1, 2, 5 and
10 unlabeled images per class, several seeds. The seed sets both the training seed and
``data.split_seed``, so each seed also draws its own N-shot images. Rows per teacher and N:

* grafting: ``configs/mnist/netgraft_<teacher>.yaml``, the paper's student (the first blocks copied from the
  teacher and kept, the rest at half width and grafted), the paper's settings, no labels, last epoch;
* grafting of the uniform half-width student (every block grafted: the baselines' student);
* grafting with the paper's N/10 rescaling of learning rates and batch (the recipes turn it off);
* KD on the same N images: ``configs/mnist/fewshot_kd.yaml`` (soft targets only, no labels), the uniform
  half-width student from scratch, a fixed budget of 500 epochs (there is no validation set to stop on);
* the student on the same N images *with* labels: ``configs/mnist/fewshot_student.yaml``, same budget;

and once per teacher, the ceiling: full-data KD (``configs/mnist/full_kd.yaml``, epoch chosen on a 5,000-
image validation split). Nothing is tuned on the test set; every run reports its wall time.

    python benchmarks/mnist_netgraft.py --root ../shared/data/mnist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from common import REPO, aggregate, machine, run

TEACHERS = {
    "vgg8_bn": {"recipe": "configs/mnist/teacher_vgg8.yaml", "graft": "configs/mnist/netgraft_vgg8.yaml",
                "student": ["student.arch=vgg8_bn", "student.width=0.125"]},
    "resnet8": {"recipe": "configs/mnist/teacher_resnet8.yaml", "graft": "configs/mnist/netgraft_resnet8.yaml",
                "student": ["student.arch=resnet8", "student.width=0.5"]},
}
SHOTS = [1, 2, 5, 10]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="../shared/data/mnist")
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--checkpoints", nargs="*", default=[], metavar="NAME=PATH",
                   help="trained teachers' model.pt (default: train each with its recipe)")
    p.add_argument("--shots", type=int, nargs="+", default=SHOTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mnist_netgraft.json"))
    p.add_argument("--runs", default="runs/bench-netgraft", help="folder for the run directories")
    p.add_argument("--render", action="store_true", help="print the tables of an existing --out file and exit")
    p.add_argument("--skip", nargs="*", default=[], metavar="TEACHER:ROW", help="rows not to run, e.g. "
                   "'resnet8:grafting, lr and batch x N/10'")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and run the missing ones")
    a = p.parse_args()
    if a.render:
        print(render(json.loads(Path(a.out).read_text())))
        return
    base = REPO / a.runs / time.strftime("%Y%m%d-%H%M%S")
    data = f"data.root={a.root}"
    given = dict(c.split("=", 1) for c in a.checkpoints)
    result: dict = {"benchmark": "mnist_netgraft", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                    "seeds": a.seeds, "shots": a.shots, "teachers": {}}
    if a.resume and Path(a.out).exists():
        result = json.loads(Path(a.out).read_text())
        result["resumed"] = [*result.get("resumed", []), time.strftime("%Y-%m-%d %H:%M")]
    for name in a.teachers:
        t = TEACHERS[name]
        ckpt = given.get(name)
        if ckpt is None:
            run("train", t["recipe"], [data], base / name / "teacher")
            ckpt = str(base / name / "teacher" / "model.pt")
        teacher = json.loads((Path(ckpt).parent / "summary.json").read_text())
        entry: dict = result["teachers"].get(name) or {"checkpoint": ckpt, "rows": {}}
        entry |= {"teacher_test_accuracy": teacher["test_accuracy"], "teacher_params": teacher["params"]}
        result["teachers"][name] = entry
        tk = [data, f"teacher.checkpoint={ckpt}"]
        rows = {
            "grafting": ("distill", t["graft"], tk, "data.shots_per_class"),
            "grafting, uniform half-width student": ("distill", t["graft"], [*tk, "method.keep_blocks=[]"],
                                                     "data.shots_per_class"),
            "grafting, lr and batch x N/10": ("distill", t["graft"], [*tk, "method.scale_with_shots=true"],
                                              "data.shots_per_class"),
            "KD on the N images": ("distill", "configs/mnist/fewshot_kd.yaml", [*tk, *t["student"]],
                                   "data.train_subset"),
            "student on the N images, labeled": (
                "train", "configs/mnist/fewshot_student.yaml",
                [data, *(o.replace("student.", "model.") for o in t["student"])], "data.train_subset"),
        }
        for row, (cmd, recipe, ov, shots_key) in rows.items():
            entry["rows"].setdefault(row, {})
            if f"{name}:{row}" in a.skip:
                continue
            for n in a.shots:
                if str(n) in entry["rows"][row]:
                    continue
                runs = [measured(run(cmd, recipe, [*ov, f"{shots_key}={n}", f"data.split_seed={s}", f"seed={s}"],
                                     base / name / f"{slug(row)}-n{n}-s{s}")) for s in a.seeds]
                entry["rows"][row][str(n)] = summarise(runs)
                print(f"[{name}] {row:38s} N={n:<3d} {line(entry['rows'][row][str(n)])}", flush=True)
                Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        if "full-data KD" in entry:
            continue
        runs = [measured(run("distill", "configs/mnist/full_kd.yaml", [*tk, *t["student"], f"seed={s}"],
                             base / name / f"fullkd-s{s}")) for s in a.seeds]
        entry["full-data KD"] = summarise(runs)
        print(f"[{name}] full-data KD {line(entry['full-data KD'])}", flush=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


def slug(row: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


def measured(r: dict) -> dict:
    """Keep what the tables need from a run's summary (parameters, grafting's export check)."""
    s = r.pop("summary")
    keys = ("params", "teacher_params", "train_time_s", "export_max_abs_diff", "folded_boundaries",
            "kept_adapter_layers")
    return r | {k: s[k] for k in keys if k in s}


def summarise(runs: list[dict]) -> dict:
    return {**aggregate(runs), "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
            "params": runs[0]["params"], "runs": runs}


def line(r: dict) -> str:
    return f"test {100 * r['mean']:.2f} +- {100 * r['std']:.2f}  ({r['params']} params, {r['wall_time_s']:.0f} s/run)"


def render(result: dict) -> str:
    lines = []
    for name, e in result["teachers"].items():
        shots = result["shots"]
        lines += [f"**{name} teacher**: test accuracy {100 * e['teacher_test_accuracy']:.2f}%, "
                  f"{e['teacher_params']:,} parameters", "",
                  "| row | params | " + " | ".join(f"N={n}" for n in shots) + " | wall time per run |",
                  "|---|---|" + "---|" * len(shots) + "---|"]
        for row, by_n in e["rows"].items():
            cells = " | ".join(f"{100 * by_n[str(n)]['mean']:.2f} +- {100 * by_n[str(n)]['std']:.2f}"
                               if str(n) in by_n else "not run" for n in shots)
            times = ", ".join(f"{by_n[str(n)]['wall_time_s']:.0f}" if str(n) in by_n else "-" for n in shots)
            lines.append(f"| {row} | {next(iter(by_n.values()))['params']:,} | {cells} | {times} s |")
        f = e.get("full-data KD")
        if f is None:
            lines.append("")
            continue
        lines += [f"| full-data KD (ceiling) | {f['params']:,} | {100 * f['mean']:.2f} +- {100 * f['std']:.2f} "
                  "(all N) |" + " |" * (len(shots) - 1) + f" {f['wall_time_s']:.0f} s |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
