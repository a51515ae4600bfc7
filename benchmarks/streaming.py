"""Streaming data (issue 18): memory flat in the dataset's size, throughput against a hand-written DataLoader,
the in-memory path's speed unchanged, and a user's own augmenting DataLoader against kdkit's reader.

Parts (``--parts``, default all), results in ``benchmarks/results/streaming.json``:

* ``rss``: peak memory of one KD epoch (LeNet-5 -> LeNet-5-half, 64x64 RGB JPEGs, batch 256) over file
  lists of 10k, 50k and 200k images drawn from one generated pool, streamed (2 workers) and decoded into
  memory: the peak proportional set size (PSS) of the run's process tree, sampled every 0.1 s (memory shared
  between the main process and its forked workers counted once), and each process's peak resident set
  (ru_maxrss; a forked worker's includes the parent pages it shares, so it moves with the parent's).
* ``throughput``: images/s of kdkit's streaming loader with 0, 1 and 2 workers against a plain DataLoader
  with the same Pillow decode, alternating, on the 50k list.
* ``mnist_epoch``: the MNIST in-memory KD epoch (the KD recipe, 2 epochs, the second timed) with this
  checkout and with ``--baseline-src`` (a checkout from before the streaming path), alternating, 3 times.
* ``user_loader``: KD on MNIST through the user's own DataLoader whose Dataset crops at random (padding 2)
  against the same recipe through kdkit's reader, seeds 0-2, paired.

    python benchmarks/streaming.py --pool /tmp/jpeg-pool --teacher runs/teachers/mnist_lenet5/model.pt \\
        --baseline-src /work/base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, machine

SIZES = (10_000, 50_000, 200_000)


def make_pool(pool: Path, n: int, size: int = 64) -> None:
    """`n` JPEGs of smooth random colour fields in 10 class folders, and lists train_<n>.csv / test.csv."""
    import numpy as np
    from PIL import Image

    if (pool / f"train_{n}.csv").is_file():
        return
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        c = i % 10
        d = pool / "img" / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"{i:06d}.jpg"
        if not f.exists():
            low = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
            Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR).save(f, quality=90)
        lines.append(f"img/c{c}/{i:06d}.jpg,{c}")
    for m in SIZES:
        if m <= n:
            (pool / f"train_{m}.csv").write_text("\n".join(lines[:m]) + "\n")
    (pool / "test.csv").write_text("\n".join(lines[:2000]) + "\n")


RSS_SCRIPT = r"""
import json, os, resource, sys, threading, time
from kdkit.config import load_config
from kdkit.run import execute

def pss_mb():  # proportional set size of this process and its descendants: shared pages counted once in all
    def tree(pid):
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                    for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except OSError:
            return []
        return [pid] + [q for k in kids for q in tree(k)]
    total = 0
    for pid in tree(os.getpid()):
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024

peak = [0.0]
def watch():
    while True:
        peak[0] = max(peak[0], pss_mb())
        time.sleep(0.1)
threading.Thread(target=watch, daemon=True).start()
cfg = load_config(None, sys.argv[1:])
t = time.time()
s = execute(cfg, "distill", overwrite=True).summary
print(json.dumps({"pss_peak_mb": round(peak[0], 1),
                  "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "wall_s": round(time.time() - t, 1), "epoch_s": s["train_time_s"], "path": s["data"]["path"]}))
"""


def _jpeg_teacher(pool: Path, out: Path) -> Path:
    """A LeNet-5 for the 64x64 RGB lists (one epoch on the 10k list): memory and speed need a teacher of the
    right input shape, not a good one."""
    teacher = out / "jpeg_teacher" / "model.pt"
    if not teacher.is_file():
        subprocess.run([sys.executable, "-m", "kdkit", "train", "data.name=filelist",
                        f"data.root={pool}/lists_{SIZES[0]}", "data.val_split=0", "model.arch=lenet5",
                        "train.epochs=1", "train.progress=none", f"output_dir={teacher.parent}"],
                       cwd=REPO, check=True, capture_output=True)
    return teacher


def part_rss(pool: Path, out: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for n in SIZES:
        lists = pool / f"lists_{n}"
        lists.mkdir(exist_ok=True)
        (lists / "train.csv").write_text("\n".join(f"../{line}" for line in (pool / f"train_{n}.csv").read_text()
                                                   .splitlines()) + "\n")
        (lists / "test.csv").write_text("\n".join(f"../{line}" for line in (pool / "test.csv").read_text()
                                                  .splitlines()) + "\n")
    teacher = _jpeg_teacher(pool, out)
    for n in SIZES:
        lists = pool / f"lists_{n}"
        for path, extra in (("stream", ["data.in_memory=false", "data.workers=2"]),
                            ("memory", ["data.in_memory=true"])):
            args = ["data.name=filelist", f"data.root={lists}", "data.val_split=0", "student.arch=lenet5_half",
                    f"teacher.checkpoint={teacher}", "train.epochs=1", "train.batch_size=256", "train.progress=none",
                    "train.teacher_cache=false", f"output_dir={out}/rss_{path}_{n}", *extra]
            p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *args], capture_output=True, text=True, cwd=REPO)
            if p.returncode != 0:
                raise SystemExit(p.stderr[-2000:])
            r = json.loads(p.stdout.strip().splitlines()[-1])
            res[f"{path} {n}"] = r
            print(f"[rss] {path} {n}: {r}", flush=True)
    return res


def _hand_loader(files: list[Path], workers: int) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> Any:
            with Image.open(files[i]) as im:
                a = np.array(im.convert("RGB"), dtype=np.uint8)
            return torch.from_numpy(a.transpose(2, 0, 1).copy()), i % 10

    def to_float(items: list[Any]) -> Any:  # the same work as kdkit's loader: float pixels in 0..1
        x, y = torch.utils.data.default_collate(items)
        return x.float().div_(255.0), y

    return torch.utils.data.DataLoader(Plain(), batch_size=256, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0, collate_fn=to_float)


def part_throughput(pool: Path, batches: int = 60) -> dict[str, Any]:
    import torch

    from kdkit.config import DataConfig
    from kdkit.data import load_data, make_loader

    lists = pool / "lists_50000"
    res: dict[str, Any] = {}
    for workers in (0, 1, 2):
        cfg = DataConfig(name="filelist", root=str(lists), val_split=0, in_memory=False, workers=workers,
                         normalize=False)
        data = load_data(cfg)
        kd = make_loader(data.train, 256, cfg, train=True, info=data.info)
        files = data.train.paths
        hand = _hand_loader(files, workers)
        rates: dict[str, list[float]] = {"kdkit": [], "hand": []}
        for rep in range(5):
            for name, loader in (("kdkit", kd), ("hand", hand)):
                if name == "kdkit":
                    loader.set_epoch(rep)
                it = iter(loader)
                next(it)  # workers up
                t, n = time.perf_counter(), 0
                for _ in range(batches):
                    b = next(it)
                    n += len(b.x) if name == "kdkit" else len(b[0])
                rates[name].append(n / (time.perf_counter() - t))
                del it
        r = {k: round(statistics.median(v)) for k, v in rates.items()}
        r["ratio"] = round(r["kdkit"] / r["hand"], 3)
        res[f"{workers} workers"] = r
        print(f"[throughput] {workers} workers: {r}", flush=True)
        del kd, hand
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return res


def part_mnist_epoch(baseline: Path | None, teacher: Path, out: Path) -> dict[str, Any]:
    srcs = {"this checkout": REPO} | ({"baseline": baseline} if baseline else {})
    times: dict[str, list[float]] = {k: [] for k in srcs}
    for rep in range(3):
        for name, src in srcs.items():
            run_dir = out / f"mnist_{name.replace(' ', '_')}_{rep}"
            cmd = [sys.executable, "-m", "kdkit", "distill", "configs/mnist/kd.yaml",
                   f"data.root={REPO.parent / 'shared' / 'data' / 'mnist'}", f"teacher.checkpoint={teacher}",
                   "train.epochs=2", "train.progress=none", f"output_dir={run_dir}"]
            shutil.rmtree(run_dir, ignore_errors=True)  # the baseline checkout predates --overwrite
            subprocess.run(cmd, cwd=src, check=True, capture_output=True)
            lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            times[name].append([x for x in lines if x.get("event") == "epoch"][-1]["epoch_time_s"])
    res = {k: {"epoch_s": v, "median_s": statistics.median(v)} for k, v in times.items()}
    if baseline:
        res["ratio"] = round(res["this checkout"]["median_s"] / res["baseline"]["median_s"], 3)
    print(f"[mnist_epoch] {res}", flush=True)
    return res


class _Cropping:
    """MNIST as a user's map-style Dataset with its own random crop (padding 2), redrawn at every read, and
    normalised like kdkit's reader does (the user's loader feeds the models as given)."""

    def __init__(self, images: Any, labels: Any, mean: float, std: float):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        import torch
        import torch.nn.functional as F

        x = F.pad(self.images[i].float() / 255.0, (2, 2, 2, 2))
        dy, dx = torch.randint(0, 5, (2,)).tolist()
        return (x[:, dy:dy + 28, dx:dx + 28] - self.mean) / self.std, int(self.labels[i])


def part_user_loader(teacher: Path, out: Path, seeds: list[int]) -> dict[str, Any]:
    import torch

    import kdkit
    from kdkit.config import DataConfig, load_config
    from kdkit.data import load_data
    from kdkit.run import execute

    root = REPO.parent / "shared" / "data" / "mnist"
    d = load_data(DataConfig(name="mnist", root=str(root), val_split=5000))
    mean, std = d.info.mean[0], d.info.std[0]
    res: dict[str, Any] = {"kdkit_reader": {}, "user_loader": {}}
    for seed in seeds:
        cfg = load_config(REPO / "configs/mnist/kd.yaml", [f"data.root={root}", f"teacher.checkpoint={teacher}",
                                                            f"seed={seed}", "train.progress=none",
                                                            f"output_dir={out}/reader_{seed}"])
        done = out / f"reader_{seed}" / "summary.json"  # a finished run of an earlier call is reused
        res["kdkit_reader"][seed] = (json.loads(done.read_text()) if done.is_file() else
                                     execute(cfg, "distill", overwrite=True).summary)["test_accuracy"]
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(_Cropping(d.train.images, d.train.labels, mean, std), batch_size=128,
                                             shuffle=True, generator=g, num_workers=0)
        val = ((d.val.images.float() / 255.0 - mean) / std, d.val.labels)
        test = ((d.test.images.float() / 255.0 - mean) / std, d.test.labels)
        r = kdkit.distill(kdkit.load(teacher), "lenet5_half", loader, val_data=val, test_data=test, seed=seed,
                          output_dir=str(out / f"user_{seed}"), overwrite=True, **_kd_recipe())
        res["user_loader"][seed] = r.summary["test_accuracy"]
        print(f"[user_loader] seed {seed}: reader {res['kdkit_reader'][seed]}, user loader "
              f"{res['user_loader'][seed]}", flush=True)
    diffs = [res["user_loader"][s] - res["kdkit_reader"][s] for s in seeds]
    res["mean_difference"] = statistics.mean(diffs)
    return res


def _kd_recipe() -> dict[str, Any]:
    """The KD recipe's method (its name and options as keywords) and train section, for the Python API."""
    import yaml

    r = yaml.safe_load((REPO / "configs/mnist/kd.yaml").read_text())
    return {"method": r["method"]["name"], **{k: v for k, v in r["method"].items() if k != "name"},
            "train": {**r["train"], "progress": "none"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["rss", "throughput", "mnist_epoch", "user_loader"])
    p.add_argument("--pool", default="/tmp/kdkit-jpeg-pool", help="folder for the generated JPEGs")
    p.add_argument("--teacher", required=True, help="a LeNet-5 MNIST model.pt (for the MNIST KD runs)")
    p.add_argument("--baseline-src", help="a kdkit checkout from before the streaming path (mnist_epoch)")
    p.add_argument("--runs", default="/tmp/kdkit-streaming-runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "streaming.json"))
    a = p.parse_args()
    pool, out, teacher = Path(a.pool), Path(a.runs), Path(a.teacher).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    results["machine"] = machine()
    results["date"] = time.strftime("%Y-%m-%d")
    if {"rss", "throughput"} & set(a.parts):
        t = time.time()
        make_pool(pool, max(SIZES))
        print(f"[pool] {max(SIZES)} JPEGs in {time.time() - t:.0f} s", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    for part in a.parts:
        t = time.time()
        if part == "rss":
            results["rss"] = part_rss(pool, out)
        elif part == "throughput":
            results["throughput"] = part_throughput(pool)
        elif part == "mnist_epoch":
            results["mnist_epoch"] = part_mnist_epoch(Path(a.baseline_src) if a.baseline_src else None, teacher, out)
        elif part == "user_loader":
            results["user_loader"] = part_user_loader(teacher, out, a.seeds)
        results.setdefault("wall_s", {})[part] = round(time.time() - t)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
