"""Helpers shared by the benchmark scripts: machine facts, one run through kdkit's own code path."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def low_label_parser(doc: str | None, name: str, runs: str) -> argparse.ArgumentParser:
    """The options every low-label MNIST benchmark takes (results go to benchmarks/results/<name>.json)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="../shared/data/mnist")
    p.add_argument("--teacher", default=None, help="a LeNet-5 model.pt (default: train one with the recipe)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"{name}.json"))
    p.add_argument("--runs", default=runs, help="folder for the run directories")
    p.add_argument("--render", action="store_true", help="print the tables of an existing --out file and exit")
    return p


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": torch.cuda.is_available()}


def command_line(command: str, recipe: str, overrides: list[str]) -> str:
    return f"kdkit {command} {recipe} " + " ".join(f"'{o}'" if (" " in o or "[" in o) else o for o in overrides)


def run(command: str, recipe: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """Run ``kdkit <command> <recipe> <overrides>`` in this process (kdkit.run.execute, the CLI's code path)."""
    from kdkit.config import load_config
    from kdkit.errors import TrainingError
    from kdkit.run import execute

    cfg = load_config(REPO / recipe, [*overrides, f"output_dir={out}", "train.progress=none"],
                      default_method="supervised" if command == "train" else "kd")
    t = time.time()
    record = {"command": command_line(command, recipe, overrides), "seed": cfg.seed, "run_dir": str(out)}
    try:
        s = execute(cfg, command).summary
    except TrainingError as e:  # a diverged run is a result too: recorded, not hidden
        print(f"  diverged: {e}", flush=True)
        return record | {"test_accuracy": None, "val_accuracy": None, "diverged": str(e),
                         "wall_time_s": round(time.time() - t, 1), "summary": {}}
    return record | {"test_accuracy": s["test_accuracy"], "val_accuracy": s["val_accuracy"],
                     "wall_time_s": round(time.time() - t, 1), "summary": s}


def quiet_host(max_steal: float, probe_s: float = 10.0, wait_s: float = 60.0, give_up_min: float = 120.0
               ) -> float | None:
    """Wait until the host of this virtual machine takes at most ``max_steal`` of the CPU time this machine asks
    for (``kdkit.cpu_steal``), probed by keeping torch's threads busy for ``probe_s`` seconds (an idle guest
    shows no steal); give up after ``give_up_min``. The last probe's steal (None without ``/proc/stat``)."""
    import torch

    from kdkit.cpu_steal import StealMeter

    deadline = time.time() + give_up_min * 60
    while True:
        meter, a, end = StealMeter(), torch.randn(256, 256), time.time() + probe_s
        while time.time() < end:
            a = torch.tanh(a @ a)
        steal = meter.fraction()
        if steal is None or steal <= max_steal or time.time() > deadline:
            return steal
        print(f"  the host is busy (CPU steal {100 * steal:.0f}%): probing again in {wait_s:.0f} s", flush=True)
        time.sleep(wait_s)


def aggregate(runs: list[dict[str, Any]], key: str = "test_accuracy") -> dict[str, Any]:
    """Mean and std over the runs that finished; `diverged` counts those stopped by a non-finite loss."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return {"mean": statistics.mean(values) if values else None,
            "std": statistics.pstdev(values) if values else None,
            "diverged": sum(1 for r in runs if r.get("diverged"))}


def pct(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "diverged"
    return f"{100 * mean:.2f}" + ("" if std is None else f" +- {100 * std:.2f}")
