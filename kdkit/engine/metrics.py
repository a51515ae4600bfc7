"""Run outputs while training: ``metrics.jsonl`` lines and progress on the terminal."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


class MetricsLog:
    """Appends one JSON object per line; only the main process writes. With `tensorboard`, every number of
    a step or epoch record is also written as a TensorBoard scalar (``<event>/<name>`` at the global step)."""

    def __init__(self, path: Path | None, tensorboard: bool = False):
        self.path = path
        self.board = None
        if tensorboard and path is not None:
            from torch.utils.tensorboard import SummaryWriter  # checked before the run starts (kdkit.run.prepare)

            self.board = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None and record.get("event") in ("step", "epoch"):
            step = int(record.get("global_step", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "global_step"):
                    self.board.add_scalar(f"{record['event']}/{k}", v, step)
            self.board.flush()

    def lines(self) -> int:
        if self.path is None or not self.path.exists():
            return 0
        with open(self.path, encoding="utf-8") as f:
            return sum(1 for _ in f)

    def truncate(self, n: int) -> None:
        """Keep the first `n` lines (a resumed run rewrites what came after its checkpoint)."""
        if self.path is None or not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for _, line in zip(range(n), f)]
        self.path.write_text("".join(kept), encoding="utf-8")


class Meter:
    """Running sums of named losses over an epoch (tensors, synced only when read)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            d = v.detach().float()
            self.sums[k] = self.sums[k] + d if k in self.sums else d.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(1, self.count) for k, v in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.sums, self.count = dict(s["sums"]), int(s["count"])


def fmt(values: dict[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        if not isinstance(v, int | float):  # lists (histograms) go to metrics.jsonl only
            continue
        if "accuracy" in k or k.endswith(("miou", "map", "map50", "recall_at_1", "eer")) or "/tar_far" in k \
                or k.startswith("tar_far"):
            parts.append(f"{k} {100 * v:.2f}%")
        elif k == "lr":
            parts.append(f"lr {v:.3g}")
        else:
            parts.append(f"{k} {v:.4g}")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    s = round(max(0.0, seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """A tqdm bar per epoch on a terminal; a plain line per epoch otherwise. Both show the time spent and the
    whole run's estimated time left (all stages), from :attr:`clock` when the engine sets it."""

    #: in "lines" mode, a long epoch prints a progress line at most this often (seconds)
    LINE_INTERVAL = 30.0

    def __init__(self, mode: str, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.bar = None
        self.desc, self.total, self.done, self.last_line = "", 0, 0, 0.0
        #: () -> "elapsed 3m05s, run ~12m left" (set by the engine)
        self.clock: Any = None

    def _clock(self) -> str:
        return f"  [{self.clock()}]" if self.clock is not None else ""

    def start_epoch(self, desc: str, total: int, initial: int = 0) -> None:
        self.desc, self.total, self.done, self.last_line = desc, total, initial, time.time()
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc + self._clock(), leave=False,
                            dynamic_ncols=True)

    def step(self, postfix: dict[str, float] | None = None) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix_str(fmt(postfix), refresh=False)
        elif self.mode == "lines" and postfix and time.time() - self.last_line > self.LINE_INTERVAL:
            self.last_line = time.time()
            self.say(f"{self.desc}  step {self.done}/{self.total}  {fmt(postfix)}{self._clock()}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def end_epoch(self, line: str) -> None:
        self.close()
        self.say(line + self._clock())

    def say(self, line: str) -> None:
        if self.mode != "none":
            print(line, file=sys.stderr, flush=True)
