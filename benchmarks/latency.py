"""CPU inference latency of kdkit model files (``model.pt``) at given batch sizes, per image and per batch.

For each batch size the models are timed in turn, round after round (``--rounds``), so that a slow spell of the
machine falls on every model rather than on one; each round gives the median of ``--repeats`` timed calls after
warm-up (kdkit.measure.latency_stats), and the figure reported is the median of the round medians, with their
range. Run it on an otherwise idle machine:

    python benchmarks/latency.py runs/teachers/boxes_centernet_resnet20 runs/compare/.../alone/seed0 \\
        --batch 1 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from kdkit.measure import count_macs, count_params, latency_stats
from kdkit.modelfile import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="run folders or model.pt files")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=100, help="timed calls per model per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds over the models at each batch size")
    a = p.parse_args()
    if a.rounds < 1 or a.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    torch.set_num_threads(a.threads)
    models = {}
    for m in a.models:
        path = Path(m) / "model.pt" if Path(m).is_dir() else Path(m)
        models[str(path)] = load(str(path)).eval()
    rows = {name: {"params": count_params(m), "macs": count_macs(m, m.kdkit_info.info.input_shape)}
            for name, m in models.items()}
    for b in a.batch:
        medians: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(a.rounds):
            for name, m in models.items():
                st = latency_stats(m, m.kdkit_info.info.input_shape, b, repeats=a.repeats, warmup=10)
                medians[name].append(st["median"])
        for name, ms in medians.items():
            mid = statistics.median(ms)
            rows[name][f"batch{b}_ms_per_image"] = round(mid, 4)
            rows[name][f"batch{b}_ms_per_batch"] = round(mid * b, 3)
            rows[name][f"batch{b}_round_medians_ms_per_image"] = [round(v, 4) for v in ms]
    print(json.dumps({"threads": a.threads, "rounds": a.rounds, "repeats": a.repeats, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
