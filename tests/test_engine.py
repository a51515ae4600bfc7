"""The engine end to end on tiny data: run files, selection on validation only, stages, resume, faults."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkit
from kdkit.config import load_config
from kdkit.data import DataBundle
from kdkit.engine import Engine
from kdkit.errors import CheckpointError, ConfigError
from kdkit.methods import METHODS, Method, Stage, Update, register
from kdkit.methods.kd import KD
from kdkit.run import execute

from .conftest import digits_overrides, distill_run, train_run


def test_train_writes_a_complete_run_directory(tmp_path):
    res = train_run(tmp_path / "r", **{"train.epochs": 3})
    d = res.run_dir
    files = {p.name for p in d.iterdir()}
    assert files >= {"config.yaml", "metrics.jsonl", "summary.json", "model.pt", "checkpoint.pt"}
    s = json.loads((d / "summary.json").read_text())
    for key in ("test_accuracy", "val_accuracy", "params", "wall_time_s", "seed"):
        assert key in s
    assert s["test_accuracy"] > 0.8 and s["params"] == sum(p.numel() for p in res.model.parameters())
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all("val/accuracy" in e for e in epochs)
    # the model file is self-describing: kdkit.load rebuilds it alone, with identical outputs
    loaded = kdkit.load(d / "model.pt")
    x = torch.randn(5, 1, 16, 16)
    res.model.eval()
    assert torch.equal(loaded(x), res.model(x))
    assert loaded.kdkit_info.info.input_shape == (1, 16, 16) and loaded.kdkit_info.arch == "mlp"


def test_kd_run_reports_teacher_and_trains_a_student(tmp_path, teacher_file):
    res = distill_run(tmp_path / "kd", teacher_file, **{"train.epochs": 4})
    s = res.summary
    assert s["method"] == "kd" and s["teacher_test_accuracy"] > 0.85 and s["test_accuracy"] > 0.8
    assert s["teacher_params"] > s["params"]
    ckpt = torch.load(res.run_dir / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["method"])  # the frozen teacher is not copied


def test_teacher_is_frozen_in_eval_mode_and_runs_without_gradients(tmp_path, teacher_file):
    cfg = load_config(None, digits_overrides(tmp_path / "x", **{"teacher.checkpoint": str(teacher_file),
                                                                 "student.arch": "mlp"}))
    from kdkit.data import load_data
    from kdkit.modelfile import build_from_config

    data = load_data(cfg.data)
    teacher = build_from_config(cfg.teacher, data.info, "teacher").model
    student = build_from_config(cfg.student, data.info, "student").model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = KD(cfg.method.options, student=student, teacher=teacher, info=data.info, train=cfg.train)
    m.train()
    assert m.student.training and not m.teacher.training
    assert not any(p.requires_grad for p in m.teacher.parameters())
    seen = []
    m.teacher.register_forward_hook(lambda mod, i, o: seen.append((mod.training, o.requires_grad)))
    from kdkit.data import BatchLoader

    batch = next(iter(BatchLoader(data.train, 16, shuffle=True, drop_last=True, mean=data.info.mean,
                                  std=data.info.std)))
    losses = m.student_step(batch)
    sum(losses.values()).backward()
    assert seen == [(False, False)]
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_selection_never_reads_the_test_split(tmp_path, monkeypatch):
    read = []
    orig = DataBundle.split

    def spy(self, name):
        read.append(name)
        return orig(self, name)

    monkeypatch.setattr(DataBundle, "split", spy)
    orig_fit = Engine.fit

    def fit(self, resume=None):
        read.append("<fit>")
        out = orig_fit(self, resume)
        read.append("</fit>")
        return out

    monkeypatch.setattr(Engine, "fit", fit)
    train_run(tmp_path / "r", **{"train.epochs": 3})
    inside = read[read.index("<fit>"): read.index("</fit>")]
    assert "test" not in inside and "val" in inside


def test_best_versus_last_selection(tmp_path):
    last = train_run(tmp_path / "last", **{"train.epochs": 3, "train.select": "last"})
    assert last.summary["stages"][0]["selected_epoch"] == 3
    best = train_run(tmp_path / "best", **{"train.epochs": 3, "train.lr": 0.05})
    st = best.summary["stages"][0]
    lines = [json.loads(x) for x in (best.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {x["epoch"]: x["val/accuracy"] for x in lines if x["event"] == "epoch"}
    assert st["val_accuracy"] == max(val.values()) and val[st["selected_epoch"]] == max(val.values())
    assert best.summary["val_accuracy"] == pytest.approx(max(val.values()))


def test_existing_run_directory_is_not_overwritten(tmp_path):
    train_run(tmp_path / "r", **{"train.epochs": 1})
    with pytest.raises(ConfigError, match="already holds a run: continue it with --resume .* --overwrite"):
        train_run(tmp_path / "r", **{"train.epochs": 1})


def test_wrong_teacher_checkpoints_are_clear_errors(tmp_path, teacher_file):
    from kdkit.errors import ModelError

    with pytest.raises(ModelError, match="holds a mlp but the config says lenet5"):
        distill_run(tmp_path / "a", teacher_file, **{"teacher.arch": "lenet5"})
    with pytest.raises(ModelError, match="trained for 10 classes .* has 3"):
        from .test_data import write_images

        write_images(tmp_path / "imgs", classes=3, per=6, size=(16, 16), mode="L")
        distill_run(tmp_path / "b", teacher_file, **{"data.name": "imagefolder", "data.root": str(tmp_path / "imgs")})
    with pytest.raises(ModelError, match=r"expects inputs of shape \(1, 16, 16\) but the data gives \(1, 8, 8\)"):
        distill_run(tmp_path / "c", teacher_file, **{"data.image_size": 8})
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="does not fit model mlp: .*missing key"):
        distill_run(tmp_path / "d", tmp_path / "raw.pt", **{"teacher.arch": "mlp"})
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="junk.pt' is corrupt or not a PyTorch file"):
        distill_run(tmp_path / "e", tmp_path / "junk.pt")


def test_model_that_cannot_take_the_images(tmp_path):
    from kdkit.errors import ModelError

    with pytest.raises(ModelError, match=r"LeNet-5 needs inputs of at least 24x24.*data.image_size"):
        train_run(tmp_path / "a", **{"model.arch": "lenet5", "data.image_size": 8})
    with pytest.raises(ConfigError, match=r"model.input_size=28 but the data \(digits\) has input_size=16"):
        train_run(tmp_path / "b", **{"model.input_size": 28})
    with pytest.raises(ModelError, match=r"model tests.user_models:fixed28 cannot take inputs of shape \(1, 16, 16\)"):
        train_run(tmp_path / "c", **{"model.arch": "null", "model.module": "tests.user_models:fixed28"})


def test_user_model_by_factory_path_trains_and_reloads(tmp_path):
    res = train_run(tmp_path / "u", **{"model.arch": "null", "model.module": "tests.user_models:TinyConvNet",
                                      "model.channels": 4})
    loaded = kdkit.load(res.run_dir / "model.pt")
    assert type(loaded).__name__ == "TinyConvNet" and loaded.head.in_features == 8


# ---------------------------------------------------------------------------------------- mechanics


@dataclass
class _NoOptions:
    pass


class _TwoStage(Method):
    """Stage 1 trains the student only; stage 2 trains an extra head only (the student must stay frozen)."""

    name = "_two_stage"
    Options = _NoOptions
    needs_teacher = False
    frozen_prefixes = ()
    starts: list[str] = []
    snapshot: dict[str, torch.Tensor] = {}

    def __init__(self, opts, **kw):
        super().__init__(opts, **kw)
        self.extra = nn.Linear(self.info.num_classes, self.info.num_classes)

    def _ce(self, batch):
        return {"ce": F.cross_entropy(self.student(batch.x), batch.y)}

    def _ce_extra(self, batch):
        return {"ce2": F.cross_entropy(self.extra(self.student(batch.x)), batch.y)}

    def _end_first(self):
        _TwoStage.snapshot = {k: v.clone() for k, v in self.student.state_dict().items()}

    def stages(self):
        return [
            Stage("first", [Update("s", list(self.student.parameters()), self._ce)], 2, [self.student],
                  on_start=lambda: _TwoStage.starts.append("first"), on_end=self._end_first),
            Stage("second", [Update("x", list(self.extra.parameters()), self._ce_extra, repeat=2,
                                    optimizer={"lr": 0.01})], 2, [self.extra],
                  on_start=lambda: _TwoStage.starts.append("second"), select="last"),
        ]

    def eval_model(self):
        return nn.Sequential(self.student, self.extra)


@pytest.fixture
def two_stage():
    register(_TwoStage)
    _TwoStage.starts = []
    yield _TwoStage
    METHODS.pop(_TwoStage.name)


def _two_stage_cfg(out, **extra):
    return load_config(None, digits_overrides(out, **{"model.arch": "mlp", "method.name": "_two_stage",
                                                       "train.deterministic": True, **extra}))


def test_stages_train_only_their_own_parameters(tmp_path, two_stage):
    res = execute(_two_stage_cfg(tmp_path / "r"), "train")
    assert two_stage.starts == ["first", "second"]
    assert [s["stage"] for s in res.summary["stages"]] == ["first", "second"]
    # the student was frozen during stage 2: identical to its state at the end of stage 1
    final = kdkit.load(res.run_dir / "model.pt").state_dict()
    assert all(torch.equal(final[k], v) for k, v in two_stage.snapshot.items())


class _Crash(Exception):
    pass


def _crash_at(monkeypatch, step: int):
    orig = Engine._step

    def step_or_crash(self, *a, **kw):
        if self.global_step == step:
            raise _Crash
        return orig(self, *a, **kw)

    monkeypatch.setattr(Engine, "_step", step_or_crash)
    return orig


@pytest.mark.parametrize("crash_step", [5, 47])  # inside stage 1 mid-epoch, inside stage 2
def test_resume_after_a_crash_gives_bit_identical_weights(tmp_path, two_stage, monkeypatch, crash_step):
    ref = execute(_two_stage_cfg(tmp_path / "ref", **{"train.checkpoint_every": 3}), "train")
    ref_state = kdkit.load(ref.run_dir / "model.pt").state_dict()
    two_stage.starts = []
    orig = _crash_at(monkeypatch, crash_step)
    cfg = _two_stage_cfg(tmp_path / "crash", **{"train.checkpoint_every": 3})
    with pytest.raises(_Crash):
        execute(cfg, "train")
    monkeypatch.setattr(Engine, "_step", orig)
    starts_before = list(two_stage.starts)
    res = execute(cfg, "train", resume=True)
    got = kdkit.load(res.run_dir / "model.pt").state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref_state.items())
    if crash_step > 40:  # stage 1 had finished: resuming does not start it again
        assert starts_before == ["first", "second"] and two_stage.starts == starts_before
    norm = [{k: v for k, v in json.loads(x).items() if k not in ("time", "epoch_time_s")}
            for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_norm = [{k: v for k, v in json.loads(x).items() if k not in ("time", "epoch_time_s")}
                for x in (ref.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert norm == ref_norm


def test_resume_refuses_a_different_config(tmp_path, two_stage, monkeypatch):
    _crash_at(monkeypatch, 4)
    with pytest.raises(_Crash):
        execute(_two_stage_cfg(tmp_path / "r"), "train")
    with pytest.raises(CheckpointError, match=r"config differs .*\(in: train\)"):
        execute(_two_stage_cfg(tmp_path / "r", **{"train.lr": 0.5}), "train", resume=True)


def test_amp_and_grad_clip_and_step_schedule_run(tmp_path):
    res = train_run(tmp_path / "r", **{"train.amp": True, "train.grad_clip": 1.0, "train.schedule": "step",
                                      "train.milestones": "[1]", "train.optimizer": "sgd", "train.lr": 0.1,
                                      "train.warmup_epochs": 0.5})
    assert res.summary["test_accuracy"] > 0.5
    lrs = [json.loads(x)["lr"] for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["event"] == "epoch"]
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.01)  # decayed by gamma after epoch 1


def test_schedules_end_at_the_time_budget():
    """With a clock (train.time_budget_min), a schedule's progress is the larger of the steps done and the budget
    spent: cosine at 0 and every decay passed when the budget is, the warm-up compressed alike; without one, or
    at a clock of 0, the planned schedule as before."""
    from kdkit.config import TrainConfig
    from kdkit.engine.optim import Schedule

    def make(clock: float | None, **kw) -> Schedule:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        sch = Schedule(opt, TrainConfig(**kw), total_steps=100, steps_per_epoch=10)
        if clock is not None:
            sch.time_progress = lambda: clock
        return sch

    for clock in (None, 0.0):
        assert make(clock).factor(50) == pytest.approx(0.5)  # half way through the planned cosine
    assert make(0.5).factor(10) == pytest.approx(0.5)  # the clock is further: half way
    assert make(0.25).factor(50) == pytest.approx(0.5)  # the steps are further
    assert make(1.0).factor(3) == 0.0 and make(7.0).factor(3) == 0.0  # the budget is spent: the end
    step = {"schedule": "step", "milestones": [0.5, 0.75], "gamma": 0.1}
    assert make(0.6, **step).factor(0) == pytest.approx(0.1) and make(None, **step).factor(60) == pytest.approx(0.1)
    assert make(0.8, **step).factor(0) == pytest.approx(0.01)
    assert make(0.05, warmup_epochs=1.0).factor(0) == pytest.approx(0.6)  # the clock's step 5 of a 10-step warm-up


def test_parameter_groups_can_have_their_own_optimizer():
    """A group with "optimizer" overrides gets its own torch optimizer and schedule, stepped after the same
    backward; state_dict round-trips; bad keys fail with the group named."""
    from kdkit.config import TrainConfig
    from kdkit.engine.optim import Schedules, build_optimizer
    from kdkit.errors import ConfigError

    a, b, c = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    cfg = TrainConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine")
    opt = build_optimizer([a, {"params": [b], "lr_scale": 2.0},
                           {"params": [c], "optimizer": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0}}], cfg)
    assert [type(o).__name__ for o in opt.members] == ["Adam", "SGD"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3, 0.1]
    sched = Schedules(opt, total_steps=4, steps_per_epoch=2)
    for p in (a, b, c):
        p.grad = torch.ones(2)
    opt.step()
    sched.step()
    assert torch.allclose(c, torch.full((2,), 0.9))  # plain SGD: 1 - 0.1 * 1
    assert torch.allclose(a, torch.full((2,), 1 - 1e-3), atol=1e-6)  # Adam's first step is about lr
    assert opt.param_groups[2]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))  # its own cosine
    again = build_optimizer([a, {"params": [b], "lr_scale": 2.0},
                             {"params": [c], "optimizer": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0}}], cfg)
    again.load_state_dict(opt.state_dict())
    assert again.state_dict() == opt.state_dict()
    with pytest.raises(ConfigError, match=r"parameter group: unknown key 'train.momentun' \(did you mean 'momentum'"):
        build_optimizer([{"params": [c], "optimizer": {"momentun": 0.5}}], cfg)


def test_adaptive_gradient_clipping_bounds_each_units_update_relative_to_its_weights():
    """AGC (Brock et al. 2021): a unit (row, filter, element) whose gradient norm exceeds ratio * ||W_i|| is scaled
    down to exactly that; smaller ones are untouched."""
    from kdkit.engine.trainer import unitwise_clip

    conv = torch.nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.ones_like(conv.weight))  # each filter's norm: sqrt(18)
        conv.bias.copy_(torch.tensor([1.0, -2.0, 0.0]))
    conv.weight.grad = torch.zeros_like(conv.weight)
    conv.weight.grad[0] = 10.0  # far too large: clipped to 0.1 * sqrt(18)
    conv.weight.grad[1] = 0.001  # small: kept
    conv.bias.grad = torch.tensor([5.0, 0.1, 1.0])
    unitwise_clip(conv.parameters(), 0.1)
    assert torch.linalg.vector_norm(conv.weight.grad[0]).item() == pytest.approx(0.1 * math.sqrt(18), rel=1e-5)
    assert torch.allclose(conv.weight.grad[1], torch.full_like(conv.weight.grad[1], 0.001))
    # biases unit by unit: |g| <= 0.1 * max(|w|, 1e-3)
    assert conv.bias.grad.tolist() == pytest.approx([0.1, 0.1, 1e-4])


def test_relative_clipping_cuts_spikes_against_the_running_mean_whatever_the_scale():
    from kdkit.engine.trainer import NORM_DECAY, relative_clip

    for scale in (1e-3, 1.0, 1e3):  # the same decisions at any loss scale
        p = torch.nn.Parameter(torch.zeros(2))
        history = [0.0, 0.0]
        kept = []
        for g in (1.0, 1.0, 1.2, 10.0, 1.0):
            p.grad = torch.tensor([g * scale, 0.0])
            relative_clip([p], torch.linalg.vector_norm(p.grad), history, 3.0)
            kept.append(p.grad[0].item() / scale)
        mean_before_spike = (NORM_DECAY * (NORM_DECAY * 1.0 + 1.0) + 1.2) / (NORM_DECAY * (NORM_DECAY + 1) + 1)
        assert kept[:3] == pytest.approx([1.0, 1.0, 1.2]) and kept[4] == pytest.approx(1.0)
        assert kept[3] == pytest.approx(3.0 * mean_before_spike, rel=1e-5)  # the spike, cut to 3x the mean


def test_checkpoint_min_skips_epoch_checkpoints_but_keeps_the_last(tmp_path, monkeypatch):
    """train.checkpoint_min: epochs of seconds with a large state need not write a checkpoint each; the start,
    the stage's last epoch and the stage's end are always written."""
    from kdkit.engine import trainer

    written: list[dict[str, int]] = []
    real = trainer.atomic_save

    def record(state, path, keep_previous=False):
        written.append(dict(state["position"]))
        real(state, path, keep_previous)

    monkeypatch.setattr(trainer, "atomic_save", record)
    train_run(tmp_path / "every", **{"train.epochs": 3})
    every = list(written)
    assert [(p["stage"], p["epoch"]) for p in every] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    written.clear()
    res = train_run(tmp_path / "sparse", **{"train.epochs": 3, "train.checkpoint_min": 60})
    assert written == [every[0], every[3], every[4]]
    assert (res.run_dir / "model.pt").is_file() and res.summary["stages"][0]["reached"]["epoch"] == 3
