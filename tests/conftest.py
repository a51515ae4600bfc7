"""Shared fixtures: tiny configs on the bundled digits data and a small trained teacher."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from kdkit.config import load_config
from kdkit.run import execute

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def digits_overrides(out: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long run on digits at 16x16 with an MLP."""
    base = {
        "output_dir": str(out), "data.name": "digits", "data.image_size": 16, "train.epochs": 2,
        "train.batch_size": 64, "train.optimizer": "adam", "train.lr": 0.003, "train.weight_decay": 0.0,
        "train.progress": "none",
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def crash_at(cfg, step: int, monkeypatch: pytest.MonkeyPatch, command: str = "distill") -> None:
    """Run `cfg` and kill it (an exception) when the engine reaches global step `step`; the engine's step is
    restored afterwards, so the caller can resume the run with ``execute(cfg, command, resume=True)``."""
    from kdkit.engine import Engine

    orig = Engine._step

    def crash(self, *a, **kw):
        if self.global_step == step:
            raise RuntimeError("killed")
        return orig(self, *a, **kw)

    monkeypatch.setattr(Engine, "_step", crash)
    with pytest.raises(RuntimeError, match="killed"):
        execute(cfg, command)
    monkeypatch.setattr(Engine, "_step", orig)


def train_run(out: Path, **extra: object):
    extra.setdefault("model.arch", "mlp")
    cfg = load_config(None, digits_overrides(out, **extra), default_method="supervised")
    return execute(cfg, "train")


def distill_run(out: Path, teacher: Path, **extra: object):
    extra.setdefault("student.arch", "mlp")
    if extra["student.arch"] == "mlp":
        extra.setdefault("student.hidden", "[32]")
    cfg = load_config(None, digits_overrides(out, **{"teacher.checkpoint": str(teacher), **extra}))
    return execute(cfg, "distill")


@pytest.fixture(scope="session", autouse=True)
def _untimed_report_cards():
    """Runs in tests leave CPU latency out of their report cards (train.latency_budget_s=0): timing every model
    of every run took a third of the suite's time. Tests marked ``timed`` time them as users' runs do."""
    import inspect

    import kdkit.run

    timed = kdkit.run._report_card
    signature = inspect.signature(timed)

    def untimed(*args: Any, **kw: Any) -> Any:
        call = signature.bind(*args, **kw)
        call.arguments["latency_budget_s"] = 0.0
        return timed(*call.args, **call.kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(kdkit.run, "_report_card", untimed)
    yield timed
    patch.undo()


@pytest.fixture(autouse=True)
def _timed_when_marked(request: pytest.FixtureRequest, _untimed_report_cards: Any,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("timed"):
        import kdkit.run

        monkeypatch.setattr(kdkit.run, "_report_card", _untimed_report_cards)


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP teacher trained for a few epochs on digits (16x16): ~95% test accuracy, a few seconds."""
    out = tmp_path_factory.mktemp("teacher")
    train_run(out / "run", **{"train.epochs": 8, "model.hidden": "[128]"})
    return out / "run" / "model.pt"


@pytest.fixture(scope="session")
def cnn_teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small VGG-style teacher (vgg8_bn, width 1/8) on digits at 16x16, for feature-map methods."""
    out = tmp_path_factory.mktemp("cnn_teacher")
    train_run(out / "run", **{"train.epochs": 4, "model.arch": "vgg8_bn", "model.width": 0.125})
    return out / "run" / "model.pt"


def idx_bytes(a: Any) -> bytes:
    """An array in the idx format (uint8 data)."""
    header = struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(">" + "I" * a.ndim, *a.shape)
    return header + a.astype("uint8").tobytes()


def write_digit_idx(root: Path) -> Path:
    """Idx files of real handwritten digits (scikit-learn's bundled 8x8 digits, upscaled to 28x28): 1,500 for
    training, the other 297 for testing. The tests do not depend on the shared MNIST files."""
    import gzip

    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) * (255 / 16)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4)).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    root.mkdir(parents=True, exist_ok=True)
    for split, sl in (("train", slice(0, 1500)), ("t10k", slice(1500, None))):
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x[sl])))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(d.target[sl])))
    return root


@pytest.fixture(scope="session")
def digit_idx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_idx(tmp_path_factory.mktemp("idx"))
