"""Speed of kdkit on this machine: engine overhead, teacher cache, speed options, end-to-end epoch, DDP.

Parts (``--parts``, default all), results in ``benchmarks/results/speed.json``:

* ``step``: ``kdkit bench speed`` (kdkit's step against a hand-written loop with the same maths, alternating)
  for LeNet-5 -> LeNet-5-half (batch 256, 1x28x28; the loader rate with MNIST's 2-pixel random crops),
  resnet56 -> resnet20 (batch 128, 3x32x32), and the adaptive method with its four default paths, FitNets
  and TH-KD on the LeNet pair.
* ``options``: the same LeNet and ResNet KD steps with ``train.channels_last``, ``train.amp`` (bfloat16
  autocast) and ``train.compile``, each alone.
* ``mnist``: real MNIST KD runs (LeNet-5 teacher -> LeNet-5-half, no augmentation, batch 256, 3 epochs):
  teacher cache on and off (epoch times, accuracy), with amp, channels_last and compile (accuracy effect).
* ``prediction``: the end-to-end epoch time of the ``mnist`` part's cache-off run against the step time alone
  (median kdkit step on the same pair and settings x steps per epoch).
* ``ddp``: one MNIST KD epoch with 1 and with 2 processes (torchrun, gloo).

    python benchmarks/speed.py --teacher runs/mnist/teacher_lenet5/model.pt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, machine, run

LENET = {"teacher": "lenet5", "student": "lenet5_half", "batch_size": 256, "input_shape": (1, 28, 28)}
RESNET = {"teacher": "resnet56", "student": "resnet20", "batch_size": 128, "input_shape": (3, 32, 32)}
STEP_ROWS = {
    "lenet kd": (LENET, "kd", ["data.augment.crop_padding=2"], 200),  # the loader rate with MNIST's augmentation
    "resnet kd": (RESNET, "kd", [], 30),
    "lenet adaptive (4 paths)": (LENET, "adaptive", [], 200),
    "lenet fitnets": (LENET, "fitnets", [], 200),
    "lenet th_kd": (LENET, "th_kd", [], 200),
}
#: the KD steps the ``options`` part measures each option on
OPTION_PAIRS = ["lenet kd", "resnet kd"]
OPTIONS = {"channels_last": ["train.channels_last=true"], "bf16 autocast": ["train.amp=true"],
           "torch.compile": ["train.compile=true"]}
#: the MNIST KD run of the ``mnist`` and ``ddp`` parts: no augmentation (so the teacher cache applies)
MNIST_KD = ["data.augment.crop_padding=0", "train.batch_size=256", "train.epochs=3", "train.warmup_epochs=0"]


def step_rows(extra: list[str], names: list[str]) -> dict[str, Any]:
    from kdkit.bench.speed import SpeedSettings, run_speed

    out = {}
    for name in names:
        pair, method, over, steps = STEP_ROWS[name]
        r = run_speed(SpeedSettings(method=method, steps=steps, warmup=10, overrides=[*over, *extra], **pair))
        out[name] = r
        print(f"[step] {name} {extra}: kdkit {r['kdkit']['median_step_ms']} ms, hand "
              f"{r['hand_written']['median_step_ms']} ms, ratio {r['ratio_kdkit_over_hand_written']}", flush=True)
    return out


def epoch_times(run_dir: str) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["epoch_time_s"] for x in lines if '"event": "epoch"' in x]


def mnist_runs(a: argparse.Namespace, base: Path) -> dict[str, Any]:
    common = [f"data.root={a.root}", f"teacher.checkpoint={a.teacher}", *MNIST_KD]
    variants = {"cache off": ["train.teacher_cache=false"], "cache on": [],
                "cache on, bf16 autocast": ["train.amp=true"], "cache on, channels_last": ["train.channels_last=true"],
                "cache on, torch.compile": ["train.compile=true"]}
    out: dict[str, Any] = {}
    for name, over in variants.items():
        r = run("distill", "configs/mnist/kd.yaml", [*common, *over], base / name.replace(" ", "_").replace(",", ""))
        r["epoch_time_s"] = epoch_times(r["run_dir"])
        out[name] = r
        print(f"[mnist] {name}: epochs {r['epoch_time_s']} s, test {r['test_accuracy']}", flush=True)
    return out


def step_prediction(a: argparse.Namespace, mnist: dict[str, Any]) -> dict[str, Any]:
    """The cache-off run's first epoch against (median kdkit step with the real teacher) x (steps per epoch)."""
    from kdkit.bench.speed import SpeedSettings, run_speed

    r = run_speed(SpeedSettings(method="kd", steps=200, warmup=10, teacher=a.teacher, student="lenet5_half",
                                batch_size=256, input_shape=(1, 28, 28),
                                overrides=["method.temperature=4", "train.optimizer=sgd", "train.lr=0.02",
                                           "train.nesterov=true", "train.momentum=0.9"]))
    run0 = mnist["cache off"]
    steps = run0["summary"]["data"]["train"] // 256
    predicted = steps * r["kdkit"]["median_step_ms"] / 1000
    measured = run0["epoch_time_s"]
    return {"steps_per_epoch": steps, "median_step_ms": r["kdkit"]["median_step_ms"],
            "predicted_epoch_s": round(predicted, 2), "measured_epoch_s": measured,
            "overhead": [round(m / predicted - 1, 4) for m in measured], "bench": r}


def ddp_rows(a: argparse.Namespace, base: Path) -> dict[str, Any]:
    out = {}
    for n in (1, 2):
        run_dir = base / f"ddp{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "kdkit",
               "distill", "configs/mnist/kd.yaml", f"data.root={a.root}", f"teacher.checkpoint={a.teacher}",
               *MNIST_KD, "train.epochs=1", "train.progress=none", f"output_dir={run_dir}"]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // n)))
        t = time.time()
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        summary = json.loads((run_dir / "summary.json").read_text())
        out[f"{n} process(es)"] = {"command": " ".join(cmd[1:]), "wall_s": round(time.time() - t, 1),
                                   "epoch_time_s": epoch_times(str(run_dir)),
                                   "threads_per_process": env["OMP_NUM_THREADS"],
                                   "test_accuracy": summary["test_accuracy"]}
        print(f"[ddp] {n}: {out[f'{n} process(es)']}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="MNIST LeNet-5 model.pt (configs/mnist/teacher_lenet5.yaml)")
    p.add_argument("--root", default="../shared/data/mnist")
    p.add_argument("--parts", nargs="+", default=["step", "options", "mnist", "prediction", "ddp"],
                   choices=["step", "options", "mnist", "prediction", "ddp"])
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS),
                   help="the speed options the options part measures")
    p.add_argument("--option-pairs", nargs="+", default=OPTION_PAIRS, choices=OPTION_PAIRS,
                   help="the KD steps the options part measures them on")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speed.json"))
    p.add_argument("--runs", default="runs/bench-speed")
    a = p.parse_args()
    out = Path(a.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"benchmark": "speed"}
    result["machine"] = machine()
    base = REPO / a.runs / time.strftime("%Y%m%d-%H%M%S")

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    if "step" in a.parts:
        result["step"] = step_rows([], list(STEP_ROWS))
        save()
    if "options" in a.parts:
        for opt in a.options:  # merged into earlier results, so options can be measured in several calls
            result.setdefault("options", {}).setdefault(opt, {}).update(step_rows(OPTIONS[opt], a.option_pairs))
            save()
    if "mnist" in a.parts:
        result["mnist"] = mnist_runs(a, base)
        save()
    if "prediction" in a.parts:  # a part of its own, so the prediction can be measured again without the runs
        result["epoch_vs_step"] = step_prediction(a, result["mnist"])
        save()
    if "ddp" in a.parts:
        result["ddp"] = ddp_rows(a, base)
        save()


if __name__ == "__main__":
    main()
