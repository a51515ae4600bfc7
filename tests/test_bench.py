"""kdkit bench speed: the hand-written loops compute what kdkit computes, the command runs, and every method's
step runs the teacher once per batch."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.bench.speed import SpeedSettings, build_sides, run_speed
from kdkit.cli import main
from kdkit.config import load_config
from kdkit.data import BatchLoader, DataInfo
from kdkit.engine import DistInfo, Engine
from kdkit.errors import ConfigError
from kdkit.methods import method_class
from kdkit.models import create

LENET = {"teacher": "lenet5", "student": "lenet5_half", "input_shape": (1, 28, 28), "batch_size": 16}
ADAPTIVE_ALL = "method.paths=[soft_target, logits, hint, attention, gram]"


@pytest.mark.parametrize(("method", "extra"), [
    ("kd", []), ("fitnets", ["method.kd_weight=0.5"]), ("adaptive", []), ("adaptive", [ADAPTIVE_ALL]),
    ("adaptive", ["method.weighting=fixed", "method.paths=[soft_target, {name: attention, weight: 3}]"]),
    ("th_kd", []),
])
def test_hand_written_loop_computes_what_kdkit_computes(method: str, extra: list[str]) -> None:
    """From identical weights and the same batches, two steps of each side give the same losses and the same
    student, adapters included: the yardstick does the same mathematics, so the speed ratio is fair."""
    sides = build_sides(SpeedSettings(method=method, overrides=["train.lr=0.05", *extra], **LENET))
    for b in sides.batches[:2]:
        logged = sides.kdkit_step(b)
        kdkit_loss = logged["loss"] if "loss" in logged else sum(logged.values())
        hand_loss = sides.hand.step(b.x, b.y)
        assert hand_loss.item() == pytest.approx(kdkit_loss.item(), rel=1e-5, abs=1e-7)
    for (name, p), q in zip(sides.method.student.named_parameters(), sides.hand.student.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    assert sum(1 for _ in sides.method.student.parameters()) == sum(1 for _ in sides.hand.student.parameters())


def test_the_hand_written_loop_declines_what_it_does_not_implement() -> None:
    with pytest.raises(ConfigError, match="--method 'attention': kdkit bench speed compares kd, fitnets"):
        build_sides(SpeedSettings(method="attention", **LENET))
    with pytest.raises(ConfigError, match="has no path softmax_regression"):
        build_sides(SpeedSettings(method="adaptive", overrides=["method.paths=[softmax_regression]"], **LENET))
    with pytest.raises(ConfigError, match="C,H,W"):
        SpeedSettings(input_shape=(3, 32), **{k: v for k, v in LENET.items() if k != "input_shape"}).validate()


def test_run_speed_reports_both_sides_and_the_loader() -> None:
    out = run_speed(SpeedSettings(method="kd", steps=3, warmup=1, **LENET))
    for side in ("kdkit", "hand_written"):
        assert out[side]["steps_per_s"] > 0
        assert out[side]["images_per_s"] == pytest.approx(16_000 / out[side]["median_step_ms"], rel=0.02)
    assert out["ratio_kdkit_over_hand_written"] == pytest.approx(
        out["hand_written"]["median_step_ms"] / out["kdkit"]["median_step_ms"], rel=0.01)
    assert out["loader"]["images_per_s"] > 0
    assert out["settings"]["input_shape"] == [1, 28, 28]


def test_bench_speed_command_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "speed", "--teacher", "lenet5", "--student", "lenet5_half", "--method", "fitnets",
               "--input-shape", "1,28,28", "--batch-size", "8", "--steps", "2", "--warmup", "1",
               "train.channels_last=true"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["method"] == "fitnets" and out["machine"]["channels_last"] is True
    assert main(["bench", "speed", "--teacher", "lenet5", "--student", "nosuch", "--input-shape", "1,28,28"]) == 2
    assert "unknown model 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize(("method", "extra", "stage"), [
    ("kd", [], 0), ("fitnets", [], 0), ("attention", [], 0), ("th_kd", [], 0),
    ("adaptive", ["method.paths=[soft_target, logits, hint, attention, gram, feature_map, softmax_regression]"], 0),
    ("sh_kd", [], 1), ("sh_kd", [], 2),
])
def test_every_method_runs_the_teacher_once_per_batch(method: str, extra: list[str], stage: int) -> None:
    """However many paths a method taps, one step makes one teacher forward pass."""
    from kdkit.bench.speed import synthetic_data

    info = DataInfo("synthetic", [str(i) for i in range(10)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
    data = synthetic_data(info, 32, 0)
    cfg = load_config(None, [f"method.name={method}", "train.batch_size=16", "train.progress=none", *extra])
    teacher, student = create("resnet8", in_channels=3), create("resnet8", in_channels=3, width=0.5)
    m = method_class(method)(cfg.method.options, student=student, teacher=teacher, info=info, train=cfg.train)
    m.data = data
    batches = list(BatchLoader(data.train, 16, shuffle=False, drop_last=True, mean=info.mean, std=info.std))
    m.setup(batches[0])
    calls = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    step = Engine(m, data, cfg, run_dir=None, dist=DistInfo(), device=torch.device("cpu")).step_function(stage)
    for b in batches:
        step(b)
    handle.remove()
    assert len(calls) == len(batches)


def test_channels_last_run_trains_like_the_default(tmp_path, cnn_teacher_file) -> None:
    """train.channels_last changes the memory layout only: the same run ends at the same accuracy."""
    from .conftest import distill_run

    extra = {"method.name": "fitnets", "student.arch": "vgg8_bn", "student.width": 0.0625}
    fast = distill_run(tmp_path / "cl", cnn_teacher_file, **extra, **{"train.channels_last": True})
    plain = distill_run(tmp_path / "plain", cnn_teacher_file, **extra)
    assert abs(fast.summary["test_accuracy"] - plain.summary["test_accuracy"]) < 0.02
    assert fast.summary["test_accuracy"] > 0.5
