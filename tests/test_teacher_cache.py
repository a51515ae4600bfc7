"""The teacher cache: exact reuse of a frozen teacher's outputs when a stage's images repeat."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdkit.teacher_cache import TeacherCache

from .conftest import distill_run


@pytest.mark.parametrize("limit_mb", [64.0, 0.0])
def test_cache_keeps_rows_per_sample(limit_mb: float, tmp_path: Path) -> None:
    cache = TeacherCache(10, limit_mb, tmp_path)
    logits, feats = torch.randn(10, 3), torch.randn(10, 2, 4, 4)
    assert cache.missing(torch.tensor([0, 1])).tolist() == [True, True]
    cache.store(torch.tensor([4, 0, 7]), {"logits:": logits[[4, 0, 7]], "layer": feats[[4, 0, 7]]})
    assert cache.missing(torch.tensor([0, 1, 7])).tolist() == [False, True, False]
    hit = cache.gather(torch.tensor([7, 4]), torch.device("cpu"))
    assert torch.equal(hit["logits:"], logits[[7, 4]]) and torch.equal(hit["layer"], feats[[7, 4]])
    spilled = list(tmp_path.glob("kdkit-teacher-cache-*/*.npy"))
    if limit_mb == 0:  # past the memory limit the buffers are memory-mapped files, removed on close
        assert len(spilled) == 2
        assert cache.stats()["disk_bytes"] == 4 * 10 * (3 + 32) and cache.stats()["memory_bytes"] == 0
    else:
        assert not spilled and cache.stats()["disk_bytes"] == 0 and cache.stats()["memory_bytes"] == 4 * 10 * 35
    cache.close()
    assert not list(tmp_path.glob("kdkit-teacher-cache-*"))


def _teacher_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the teacher's forward passes during training steps (not evaluation)."""
    from kdkit.methods.distiller import Distiller

    calls: list[int] = []
    orig = Distiller.teacher_forward

    def counted(self, x):
        calls.append(len(x))
        return orig(self, x)

    monkeypatch.setattr(Distiller, "teacher_forward", counted)
    return calls


@pytest.mark.parametrize("method", ["kd", "fitnets"])
def test_later_epochs_skip_the_teacher_and_serve_its_outputs(method: str, tmp_path: Path, cnn_teacher_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Epochs 2 and 3 read logits (and, for FitNets, the hint layer's features) from the cache: each image goes
    through the teacher at most once, and what the cache serves is what the teacher computes on that batch."""
    from kdkit.methods.distiller import Distiller

    extra = {"method.name": method, "train.epochs": 3, "student.arch": "vgg8_bn", "student.width": 0.0625}
    calls = _teacher_calls(monkeypatch)
    served_logits = Distiller.teacher_logits
    gaps: list[float] = []

    def checked(self, batch):
        logits = served_logits(self, batch)
        if self.teacher_cache is not None:
            taps = self.teacher_taps
            served = {} if taps is None else {k: v.clone() for k, v in taps.values.items()}
            with torch.no_grad():
                fresh = self.teacher(batch.x)
            gaps.append(float((fresh - logits).abs().max()))
            gaps.extend(float((taps.values[k] - v).abs().max()) for k, v in served.items())
        return logits

    monkeypatch.setattr(Distiller, "teacher_logits", checked)
    cached = distill_run(tmp_path / "cached", cnn_teacher_file, **extra)
    n_cached = sum(calls)
    monkeypatch.setattr(Distiller, "teacher_logits", served_logits)
    calls.clear()
    plain = distill_run(tmp_path / "plain", cnn_teacher_file, **extra, **{"train.teacher_cache": False})
    n_plain = sum(calls)
    train_images = cached.summary["data"]["train"]
    steps = train_images // 64
    probe = 2 if method == "fitnets" else 0  # FitNets looks at two images once to size its adapter
    assert n_plain == probe + 3 * steps * 64
    # all of epoch 1, then only the few images that epoch 1's dropped partial batch left out
    assert probe + steps * 64 < n_cached <= probe + train_images
    stats = cached.summary["stages"][0]["teacher_cache"]
    assert stats["misses"] == n_cached - probe and stats["hits"] + stats["misses"] == 3 * steps * 64
    assert len(gaps) == 3 * steps * (2 if method == "fitnets" else 1) and max(gaps) < 1e-4
    assert "teacher_cache" not in plain.summary["stages"][0]
    # the same training up to float rounding (a batch's teacher outputs differ from a cached row by ~1e-6,
    # which 60 SGD steps amplify a little): the two students agree on the test set
    assert abs(cached.summary["test_accuracy"] - plain.summary["test_accuracy"]) < 0.02


@pytest.mark.parametrize("why", [{"data.augment.crop_padding": 2}, {"train.deterministic": True}],
                         ids=["augmented", "deterministic"])
def test_no_cache_when_images_vary_or_runs_must_resume_bit_for_bit(why: dict, tmp_path: Path, teacher_file: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """Augmented images never repeat; in deterministic mode a resumed run must match an uninterrupted one,
    which cached rows computed in other batches (different last bits) would break."""
    calls = _teacher_calls(monkeypatch)
    r = distill_run(tmp_path / "run", teacher_file, **{"train.epochs": 2, **why})
    assert "teacher_cache" not in r.summary["stages"][0]
    assert sum(calls) == 2 * (r.summary["data"]["train"] // 64) * 64


def test_a_teacher_that_trains_is_never_cached(tmp_path: Path) -> None:
    from kdkit.config import load_config
    from kdkit.data import DataInfo
    from kdkit.methods import method_class
    from kdkit.models import create

    info = DataInfo("x", [str(i) for i in range(10)], (3, 16, 16), [0.5] * 3, [0.25] * 3)
    cfg = load_config(None, ["method.name=kd"])
    m = method_class("kd")(cfg.method.options, student=create("mlp", input_size=16),
                           teacher=create("mlp", input_size=16), info=info, train=cfg.train)
    assert m.set_teacher_cache(TeacherCache(4, 1.0))
    next(m.teacher.parameters()).requires_grad_(True)  # e.g. SH-KD's stage that fine-tunes the teacher
    assert not m.set_teacher_cache(TeacherCache(4, 1.0)) and m.teacher_cache is None
