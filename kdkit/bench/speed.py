"""``kdkit bench speed``: kdkit's training step against a hand-written PyTorch loop doing the same mathematics.

Both sides are built from one kdkit method (see :mod:`kdkit.bench.reference`): the kdkit side steps through
the real engine (:meth:`kdkit.engine.Engine.step_function`: trainable parameters, optimizer, schedule,
autocast, the finiteness check, running means, logging); the hand-written side is plain PyTorch. They
alternate step by step on the same pre-made batches, so drift in the machine's speed affects both alike,
and the figures are medians over ``steps`` steps after ``warmup`` steps each. The data is random images of
the given shape in kdkit's in-memory loader, whose own throughput is reported too; the teacher is a zoo
model with random weights (or a kdkit model file). Peak memory is the growth of the process's resident
set over a few steps of each side (Linux ``VmHWM``, reset between sides), or CUDA's peak allocation.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from ..data import BatchLoader, DataBundle, DataInfo, ImageSet, augment_from
from ..engine import DistInfo, Engine, apply_speed_options
from ..errors import ConfigError
from ..methods import method_class
from ..modelfile import build_from_config
from .reference import SUPPORTED, HandLoop


@dataclass
class SpeedSettings:
    teacher: str
    student: str
    method: str = "kd"
    batch_size: int = 64
    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    steps: int = 50
    warmup: int = 10
    seed: int = 0
    #: further dotted config overrides (method options, train.channels_last, train.amp, train.compile...)
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.method not in SUPPORTED:
            raise ConfigError(f"--method {self.method!r}: kdkit bench speed compares {', '.join(SUPPORTED)}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ConfigError(f"--input-shape: expected C,H,W, e.g. 3,32,32; got {self.input_shape}")
        for name in ("batch_size", "steps", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup < 0:
            raise ConfigError("--warmup must be 0 or more")


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--input-shape: expected C,H,W such as 3,32,32; got {text!r}") from None
    return c, h, w


def synthetic_data(info: DataInfo, n: int, seed: int) -> DataBundle:
    """Random uint8 images and labels in the exact form kdkit's datasets take in memory."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *info.input_shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, info.num_classes, (n,), generator=g)
    train = ImageSet(images, labels, info.classes)
    return DataBundle(info, train, None, train)


def _config(s: SpeedSettings) -> Any:
    teacher = f"teacher.checkpoint={s.teacher}" if Path(s.teacher).suffix in (".pt", ".pth") else \
        f"teacher.arch={s.teacher}"
    return load_config(None, [f"method.name={s.method}", f"student.arch={s.student}", teacher,
                              f"train.batch_size={s.batch_size}", "train.progress=none", "train.schedule=constant",
                              f"seed={s.seed}", *s.overrides])


def _peak_memory_mb(run: Callable[[], None], device: torch.device) -> float | None:
    """Growth of memory while `run` runs: CUDA's peak allocation, or the resident set's high-water mark."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    status = Path("/proc/self/status")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the other side's peak shows
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        return None

    def field_kb(name: str) -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith(name))
        return int(line.split()[1])

    base = field_kb("VmRSS:")
    run()
    return round((field_kb("VmHWM:") - base) / 1024, 1)


def _loader_rate(loader: BatchLoader, seconds: float = 1.0) -> float:
    """Images per second the in-memory loader delivers on its own (batches made and discarded)."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in loader:
            n += len(b)
    return n / (time.perf_counter() - t0)


@dataclass
class Sides:
    """Both sides of the comparison, from identical weights, and the batches they step on."""

    method: Any
    hand: HandLoop
    kdkit_step: Callable[[Any], dict[str, torch.Tensor]]
    autocast: Any
    batches: list[Any]
    loader: BatchLoader
    device: torch.device
    train: Any


def build_sides(s: SpeedSettings) -> Sides:
    """The kdkit method (through the real engine) and its hand-written twin, before either takes a step."""
    s.validate()
    torch.manual_seed(s.seed)
    cfg = _config(s)
    c, h, w = s.input_shape
    info = DataInfo("synthetic", [str(i) for i in range(s.num_classes)], (c, h, w), [0.5] * c, [0.25] * c)
    data = synthetic_data(info, s.batch_size * 8, s.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    teacher = build_from_config(cfg.teacher, info, "teacher").model
    student = build_from_config(cfg.student, info, "student").model
    tc = cfg.train
    method = method_class(s.method)(cfg.method.options, student=student, teacher=teacher, info=info, train=tc)
    method.to(device)
    method.data = data
    loader = BatchLoader(data.train, s.batch_size, shuffle=True, drop_last=True, mean=info.mean, std=info.std,
                         augment=augment_from(cfg.data), seed=s.seed, device=device,
                         channels_last=tc.channels_last)
    batches = list(loader)
    method.setup(batches[0])
    hand = HandLoop(method, tc)  # identical weights: copied before either side takes a step
    apply_speed_options(tc, [method], [method.student, method.teacher])
    apply_speed_options(tc, [hand.student, hand.teacher, hand.adapters], [hand.student, hand.teacher])
    engine = Engine(method, data, cfg, run_dir=None, dist=DistInfo(), device=device)
    return Sides(method, hand, engine.step_function(), engine.autocast, batches, loader, device, tc)


def run_speed(s: SpeedSettings) -> dict[str, Any]:
    """Time kdkit's step and the hand-written loop's, alternating; returns the JSON-ready figures."""
    sd = build_sides(s)
    device, tc, n = sd.device, sd.train, len(sd.batches)
    sides: dict[str, Callable[[int], Any]] = {
        "kdkit": lambda i: sd.kdkit_step(sd.batches[i % n]),
        "hand_written": lambda i: sd.hand.step(sd.batches[i % n].x, sd.batches[i % n].y, sd.autocast)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(s.warmup + s.steps):
        for name, fn in sides.items():
            sync()
            t0 = time.perf_counter()
            fn(i)
            sync()
            if i >= s.warmup:
                times[name].append(time.perf_counter() - t0)
    memory = {name: _peak_memory_mb(lambda fn=fn: [fn(i) for i in range(3)], device) for name, fn in sides.items()}
    out: dict[str, Any] = {"settings": asdict(s) | {"input_shape": list(s.input_shape)}}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_step_ms": round(1000 * med, 3), "mean_step_ms": round(1000 * statistics.mean(ts), 3),
                     "steps_per_s": round(1 / med, 3), "images_per_s": round(s.batch_size / med, 1),
                     "peak_memory_mb": memory[name]}
    out["ratio_kdkit_over_hand_written"] = round(statistics.median(times["hand_written"]) /
                                                 statistics.median(times["kdkit"]), 3)
    rate = _loader_rate(sd.loader)
    out["loader"] = {"images_per_s": round(rate, 1),
                     "times_kdkit_step_consumption": round(rate / out["kdkit"]["images_per_s"], 2)}
    out["machine"] = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "channels_last": tc.channels_last, "compile": tc.compile, "amp": tc.amp}
    sd.method.finish()
    sd.hand.remove()
    return out


def main(args: Any) -> int:
    settings = SpeedSettings(teacher=args.teacher, student=args.student, method=args.method,
                             batch_size=args.batch_size, input_shape=parse_shape(args.input_shape),
                             num_classes=args.num_classes, steps=args.steps, warmup=args.warmup, seed=args.seed,
                             overrides=list(args.overrides))
    print(json.dumps(run_speed(settings)))
    return 0
