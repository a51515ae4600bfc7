"""Low-label MNIST benchmark of head sharing: student alone, KD, TH-KD, SH-KD (one command).

The protocol of the adaptive benchmark: the LeNet-5 teacher trained on all of MNIST, students on 100
labeled images per class (seeded, after a 1,000-image validation split). Two pairs:

* equal embedding widths: LeNet-5-half with an 84-d embedding (``student.embed_dim=84``), no projector;
* unequal widths: LeNet-5-half (42-d embedding) against the teacher's 84-d, through a learned projector.

Settings tuned on the validation split only (seed 0, equal-width pair), then used for both pairs: the
TH-KD weight th_weight, and SH-KD's stage-2 learning rate and epochs. Each row reports test accuracy
over the seeds, wall time, the SH teacher's own test accuracy, and the mean per-class cosine similarity
between the student's and the teacher's heads at the end (through the projector where widths differ;
not defined for KD and the student alone with unequal widths, which have no projector).

    python benchmarks/mnist_head_sharing.py --root ../shared/data/mnist --seeds 0 1 2
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import REPO, aggregate, low_label_parser, machine, run

import kdkit
from kdkit.heads import head_cosine

HERE = Path(__file__).resolve().parent
# the pair's student setting overrides the recipe's (th_kd.yaml and sh_kd.yaml set embed_dim: 84)
PAIRS = {"equal widths (84-d embeddings)": ["student.embed_dim=84"],
         "unequal widths (42-d vs 84-d)": ["student.embed_dim=null"]}
TH_WEIGHTS = [0.1, 0.5, 1.0, 2.0]
SH_STAGE2 = [(1e-4, 20), (3e-4, 20), (1e-4, 50)]  # (teacher_lr, teacher_epochs)


def file_head_cosine(student_file: Path, teacher_file: str) -> float | None:
    s, t = kdkit.load(student_file), kdkit.load(teacher_file)
    return head_cosine(s.classifier, t.classifier)


def main() -> None:
    a = low_label_parser(__doc__, "mnist_head_sharing", "runs/bench-heads").parse_args()
    if a.render:
        print(render(json.loads(Path(a.out).read_text())))
        return
    base = REPO / a.runs / time.strftime("%Y%m%d-%H%M%S")
    data = f"data.root={a.root}"
    result: dict = {"benchmark": "mnist_head_sharing", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                    "seeds": a.seeds, "pairs": {}}
    teacher = a.teacher
    if teacher is None:
        result["teacher"] = run("train", "configs/mnist/teacher_lenet5.yaml", [data], base / "teacher")
        teacher = str(base / "teacher" / "model.pt")
    result["teacher_checkpoint"] = teacher
    tk = [data, f"teacher.checkpoint={teacher}"]
    equal = next(iter(PAIRS.values()))

    print("tuning on validation (seed 0, equal widths)", flush=True)
    tuning = {"th_weight": {}, "sh_stage2": {}}
    for w in TH_WEIGHTS:
        r = run("distill", "configs/mnist/th_kd.yaml", [*tk, *equal, f"method.th_weight={w}", "seed=0"],
                base / f"tune-th-{w}")
        tuning["th_weight"][str(w)] = r["val_accuracy"]
        print(f"  th_weight {w}: val {100 * r['val_accuracy']:.2f}%", flush=True)
    for lr, ep in SH_STAGE2:
        r = run("distill", "configs/mnist/sh_kd.yaml",
                [*tk, *equal, f"method.teacher_lr={lr}", f"method.teacher_epochs={ep}", "seed=0"],
                base / f"tune-sh-{lr}-{ep}")
        tuning["sh_stage2"][f"{lr},{ep}"] = r["val_accuracy"]
        print(f"  SH stage 2 lr {lr}, {ep} epochs: val {100 * r['val_accuracy']:.2f}%", flush=True)
    th_w = max(TH_WEIGHTS, key=lambda w: tuning["th_weight"][str(w)])
    sh_lr, sh_ep = max(SH_STAGE2, key=lambda c: tuning["sh_stage2"][f"{c[0]},{c[1]}"])
    result["tuning"] = tuning | {"chosen": {"th_weight": th_w, "teacher_lr": sh_lr, "teacher_epochs": sh_ep}}

    for pair, pov in PAIRS.items():
        rows = {
            "student alone": ("train", "configs/mnist/lowlabel_student.yaml",
                              [data, *[o.replace("student.", "model.") for o in pov]]),
            "KD": ("distill", "configs/mnist/lowlabel_kd.yaml", [*tk, *pov]),
            "TH-KD": ("distill", "configs/mnist/th_kd.yaml", [*tk, *pov, f"method.th_weight={th_w}"]),
            "SH-KD": ("distill", "configs/mnist/sh_kd.yaml",
                      [*tk, *pov, f"method.teacher_lr={sh_lr}", f"method.teacher_epochs={sh_ep}"]),
        }
        table = {}
        for name, (cmd, recipe, ov) in rows.items():
            runs = []
            for s in a.seeds:
                out = base / pair.split()[0] / f"{name.replace(' ', '_')}-s{s}"
                r = run(cmd, recipe, [*ov, f"seed={s}"], out)
                summ = r.pop("summary")
                r["student_embed_dim"] = kdkit.load(out / "model.pt").classifier.in_features
                if r["student_embed_dim"] != (84 if "equal widths" in pair and "unequal" not in pair else 42):
                    raise SystemExit(f"{pair}/{name}: the student's embedding is {r['student_embed_dim']}-d")
                r["head_cosine"] = summ.get("head_cosine", file_head_cosine(out / "model.pt", teacher))
                r["sh_teacher_test_accuracy"] = summ.get("test_accuracy_sh_teacher")
                r["teacher_head_test_accuracy"] = summ.get("test_accuracy_teacher_head")
                runs.append(r)
            row = {**aggregate(runs), "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs), "runs": runs}
            cos = [r["head_cosine"] for r in runs if r["head_cosine"] is not None]
            row["head_cosine"] = statistics.mean(cos) if cos else None
            sh = [r["sh_teacher_test_accuracy"] for r in runs if r["sh_teacher_test_accuracy"] is not None]
            row["sh_teacher_test_accuracy"] = statistics.mean(sh) if sh else None
            table[name] = row
            print(f"[{pair}] {name:14s} test {100 * row['mean']:.2f} +- {100 * row['std']:.2f}  "
                  f"cos {row['head_cosine']}  {row['wall_time_s']:.0f}s/run", flush=True)
        result["pairs"][pair] = table
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


def render(result: dict) -> str:
    lines = []
    for pair, table in result["pairs"].items():
        lines += [f"**{pair}**", "", "| row | test accuracy (mean +- std) | per seed | head cosine | "
                  "SH teacher's own test accuracy | wall time per run |", "|---|---|---|---|---|---|"]
        for name, r in table.items():
            per = ", ".join(f"{100 * x['test_accuracy']:.2f}" for x in r["runs"])
            cos = "n/a" if r["head_cosine"] is None else f"{r['head_cosine']:.3f}"
            sh = "" if r["sh_teacher_test_accuracy"] is None else f"{100 * r['sh_teacher_test_accuracy']:.2f}%"
            lines.append(f"| {name} | {100 * r['mean']:.2f} +- {100 * r['std']:.2f} | {per} | {cos} | {sh} | "
                         f"{r['wall_time_s']:.0f} s |")
        lines.append("")
    lines.append(f"Tuned on validation (seed 0): {result['tuning']['chosen']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
