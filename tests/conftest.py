"""Shared fixtures: tiny configs on the bundled digits data and a small trained teacher."""

from __future__ import annotations

import os
from pathlib import Path

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
