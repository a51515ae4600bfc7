"""CPU inference latency of kdkit model files (``model.pt``) at given batch sizes, per image and per batch.

Median and quartiles of timed calls after warm-up (kdkit.measure.latency_stats), the models alternating batch
size by batch size; run it on an otherwise idle machine:

    python benchmarks/latency.py runs/teachers/boxes_centernet_resnet20 runs/compare/.../alone/seed0 \\
        --batch 1 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kdkit.measure import count_macs, count_params, latency_stats
from kdkit.modelfile import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="run folders or model.pt files")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=100)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    models = {}
    for m in a.models:
        path = Path(m) / "model.pt" if Path(m).is_dir() else Path(m)
        models[str(path)] = load(str(path)).eval()
    rows = {name: {"params": count_params(m), "macs": count_macs(m, m.kdkit_info.info.input_shape)}
            for name, m in models.items()}
    for b in a.batch:
        for name, m in models.items():
            st = latency_stats(m, m.kdkit_info.info.input_shape, b, repeats=a.repeats, warmup=10)
            rows[name][f"batch{b}_ms_per_image"] = round(st["median"], 4)
            rows[name][f"batch{b}_ms_per_batch"] = round(st["median"] * b, 3)
            rows[name][f"batch{b}_quartiles_ms_per_image"] = [round(st["q1"], 4), round(st["q3"], 4)]
    print(json.dumps({"threads": a.threads, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
