"""What a data-free generator step costs on this machine: one RDSKD generator update (generator forward, LeNet-5
teacher forward and backward to the images, generator backward, Adam step) at several generator widths and
batch sizes, and the generator's 2x upsampling written as ``F.interpolate`` against kdkit's broadcast.

    python benchmarks/generator_cost.py [--widths 128 64 32 16] [--batches 512 256 128 64] [--repeats 5]

Prints a table and writes benchmarks/results/generator_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from common import REPO, machine

from kdkit import generators
from kdkit.generators import DAFLGenerator
from kdkit.losses.datafree import diversity_seeking_loss, exp_penalty, information_entropy_loss, one_hot_loss
from kdkit.models import create


def step_time(width: int, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    teacher = create("lenet5", num_classes=10, in_channels=1, input_size=28).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = DAFLGenerator((1, 28, 28), 100, width)
    opt = torch.optim.Adam(gen.parameters(), 1e-3)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        x = gen(torch.randn(batch, 100))
        o = teacher(x)
        loss = exp_penalty(one_hot_loss(o), 0.0) + exp_penalty(information_entropy_loss(o), 0.0) + \
            diversity_seeking_loss(x, o)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up the allocator
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 64, 32, 16])
    p.add_argument("--batches", type=int, nargs="+", default=[512, 256, 128, 64])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    rows = []
    for w in a.widths:
        for b in a.batches:
            s = step_time(w, b, a.repeats)
            rows.append({"width": w, "batch": b, "step_s": round(s, 4), "images_per_s": round(b / s, 1)})
            print(f"width {w:4d} batch {b:4d}: {1000 * s:8.1f} ms/step  {b / s:8.0f} images/s", flush=True)
    fast = generators.upsample2x
    generators.upsample2x = lambda x: F.interpolate(x, scale_factor=2)  # the authors' op, same numbers
    try:
        interp = step_time(a.widths[0], a.batches[0], a.repeats)
    finally:
        generators.upsample2x = fast
    mine = next(r["step_s"] for r in rows if r["width"] == a.widths[0] and r["batch"] == a.batches[0])
    print(f"width {a.widths[0]} batch {a.batches[0]} with F.interpolate: {1000 * interp:.1f} ms/step "
          f"(broadcast upsampling: {1000 * mine:.1f} ms)")
    out = {"benchmark": "generator_cost", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "rows": rows,
           "interpolate": {"width": a.widths[0], "batch": a.batches[0], "step_s": round(interp, 4)}}
    (REPO / "benchmarks" / "results" / "generator_cost.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
