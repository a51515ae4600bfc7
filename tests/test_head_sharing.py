"""TH-KD and SH-KD: the shared head stays frozen, gradients go where they should, exports are exact."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kdkit
from kdkit.config import load_config
from kdkit.data import BatchLoader, load_data
from kdkit.engine import DistInfo, Engine
from kdkit.errors import ConfigError
from kdkit.heads import MixedHead, fold, head_cosine
from kdkit.losses import embedding_distance, kd_loss
from kdkit.methods import method_class
from kdkit.modelfile import build_from_config
from kdkit.run import execute

from .conftest import ROOT, crash_at, digits_overrides, distill_run

NARROW = {"student.arch": "mlp", "student.hidden": "[32]"}  # 32-d embedding; the teacher's is 128-d
WIDE = {"student.arch": "mlp", "student.hidden": "[128]"}  # same width as the teacher's embedding


def build(tmp_path, teacher, method="th_kd", **extra):
    cfg = load_config(None, digits_overrides(tmp_path, **{"teacher.checkpoint": str(teacher), "method.name": method,
                                                          **extra}))
    data = load_data(cfg.data)
    t = build_from_config(cfg.teacher, data.info, "teacher").model
    s = build_from_config(cfg.student, data.info, "student").model
    m = method_class(method)(cfg.method.options, student=s, teacher=t, info=data.info, train=cfg.train)
    batch = next(iter(BatchLoader(data.train, 32, shuffle=True, drop_last=True, mean=data.info.mean,
                                  std=data.info.std)))
    m.setup(batch)
    return m, batch, cfg, data


def test_projector_exactly_when_widths_differ(tmp_path, teacher_file):
    narrow, *_ = build(tmp_path, teacher_file, **NARROW)
    assert narrow.widths == (32, 128) and isinstance(narrow.projector[0], nn.Linear)
    assert narrow.projector[0].in_features == 32 and narrow.projector[0].out_features == 128
    wide, *_ = build(tmp_path, teacher_file, **WIDE)
    assert wide.widths == (128, 128) and wide.projector is None
    bn, *_ = build(tmp_path, teacher_file, **NARROW, **{"method.projector_bn": True})
    assert isinstance(bn.projector[1], nn.BatchNorm1d)


def test_th_gradients_reach_the_student_backbone_and_projector_only(tmp_path, teacher_file):
    m, batch, *_ = build(tmp_path, teacher_file, **NARROW, **{"method.ce_weight": 0, "method.kd_weight": 0})
    m.train()
    losses = m.student_step(batch)
    assert set(losses) == {"th"}
    losses["th"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.layers.parameters())
    assert all(p.grad is not None for p in m.projector.parameters())
    assert all(p.grad is None for p in m.student.classifier.parameters())  # the TH term bypasses the student head
    assert all(p.grad is None for p in m.teacher.parameters())


def test_loss_terms_against_hand_values(tmp_path, teacher_file):
    m, batch, *_ = build(tmp_path, teacher_file, **NARROW, **{
        "method.th_weight": 0.7, "method.th_ce_weight": 0.3, "method.emb_weight": 2.0, "method.temperature": 3.0})
    m.eval()
    losses = m.student_step(batch)
    with torch.no_grad():
        feats = {}
        h1 = m.student.classifier.register_forward_pre_hook(lambda mod, a: feats.__setitem__("s", a[0]))
        h2 = m.teacher.classifier.register_forward_pre_hook(lambda mod, a: feats.__setitem__("t", a[0]))
        z_t, z_s = m.teacher(batch.x), m.student(batch.x)
        h1.remove()
        h2.remove()
        p = m.projector(feats["s"])
        z_th = m.teacher.classifier(p)
        ns, nt = p / p.norm(dim=1, keepdim=True), feats["t"] / feats["t"].norm(dim=1, keepdim=True)
        emb = ((ns - nt) ** 2).sum(1).mean()
    assert losses["th"].item() == pytest.approx(0.7 * kd_loss(z_th, z_t, 3.0).item(), rel=1e-5)
    assert losses["th_ce"].item() == pytest.approx(0.3 * nn.functional.cross_entropy(z_th, batch.y).item(), rel=1e-5)
    assert losses["emb"].item() == pytest.approx(2.0 * emb.item(), rel=1e-5)
    assert losses["kd"].item() == pytest.approx(1.5 * kd_loss(z_s, z_t, 3.0).item(), rel=1e-5)
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    assert embedding_distance(a, b, "l2").item() == pytest.approx(0.4 ** 2 + 0.8 ** 2)
    assert embedding_distance(a, b, "cosine").item() == pytest.approx(1 - 0.6)


def test_shared_head_stays_bit_identical_and_gets_no_optimizer_updates(tmp_path, teacher_file):
    m, _, cfg, data = build(tmp_path, teacher_file, **NARROW, **{"train.epochs": 2})
    head = {k: v.clone() for k, v in m.teacher.classifier.state_dict().items()}
    stage = m.stages()[0]
    trainable = {id(p) for p in stage.trainable()}
    assert not any(id(p) in trainable for p in m.teacher.parameters())
    engine = Engine(m, data, cfg, run_dir=None, dist=DistInfo(), device=torch.device("cpu"))
    engine.fit()
    assert all(torch.equal(v, m.teacher.classifier.state_dict()[k]) for k, v in head.items())
    assert not any(p.requires_grad for p in m.teacher.parameters())


def test_init_student_head_from_the_teacher(tmp_path, teacher_file):
    m, *_ = build(tmp_path, teacher_file, **WIDE, **{"method.init_student_head": True})
    assert torch.equal(m.student.classifier.weight, m.teacher.classifier.weight)
    with pytest.raises(ConfigError, match="needs equal embedding widths; the student's is 32, the teacher's 128"):
        build(tmp_path, teacher_file, **NARROW, **{"method.init_student_head": True})


@pytest.mark.parametrize("head", ["teacher", "mix"])
def test_exported_heads_are_plain_students_with_identical_outputs(tmp_path, teacher_file, head):
    res = distill_run(tmp_path / head, teacher_file, **NARROW, **{
        "method.name": "th_kd", "method.export_head": head, "method.projector_bn": True, "train.epochs": 2})
    s = res.summary
    assert {"test_accuracy_teacher_head", "test_accuracy_mix", "head_cosine"} <= set(s)
    loaded = kdkit.load(res.run_dir / "model.pt")
    assert type(loaded).__name__ == "MLP" and loaded.classifier.in_features == 32
    x = torch.randn(7, 1, 16, 16)
    res.model.eval()
    assert torch.allclose(loaded(x), res.model(x), atol=1e-5)
    if head == "teacher":  # a plain Linear of the student's own shape: the architecture is unchanged
        assert isinstance(loaded.classifier, nn.Linear) and s["params"] == sum(p.numel() for p in loaded.parameters())
    else:
        assert isinstance(loaded.classifier, MixedHead)


def test_fold_and_mixed_head_are_exact():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    chain.train()
    chain(torch.randn(64, 5))  # give the BatchNorm running statistics
    chain.eval()
    x = torch.randn(9, 5)
    assert torch.allclose(fold(*chain)(x), chain(x), atol=1e-5)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    mix = MixedHead.of(a, b, 0.25)
    p = 0.75 * torch.softmax(a(x), 1) + 0.25 * torch.softmax(b(x), 1)
    assert torch.allclose(mix(x).exp(), p, atol=1e-6)
    assert head_cosine(a, a) == pytest.approx(1.0)
    assert head_cosine(nn.Linear(4, 3), nn.Linear(6, 3)) is None


def _sh_cfg(out, teacher, **extra):
    return load_config(None, digits_overrides(out, **{
        "teacher.checkpoint": str(teacher), "method.name": "sh_kd", "train.epochs": 2, "train.deterministic": True,
        **WIDE, **extra}))


def test_sh_kd_runs_three_stages_and_stage2_head_is_stage1s(tmp_path, teacher_file):
    res = execute(_sh_cfg(tmp_path / "r", teacher_file), "distill")
    s, d = res.summary, res.run_dir
    assert [x["stage"] for x in s["stages"]] == ["student", "teacher", "distill"]
    assert {"test_accuracy_stage1_student", "test_accuracy_sh_teacher"} <= set(s)
    s1, t2 = kdkit.load(d / "stage1_student.pt"), kdkit.load(d / "stage2_teacher.pt")
    assert torch.equal(t2.classifier.weight, s1.classifier.weight)
    assert torch.equal(t2.classifier.bias, s1.classifier.bias)
    assert s["head_cosine"] == pytest.approx(head_cosine(res.model.classifier, t2.classifier))
    assert s["stage1_head_cosine"] == pytest.approx(1.0)
    # the teacher's backbone was trained in stage 2
    original = kdkit.load(teacher_file)
    assert not torch.equal(original.layers[0][0].weight, t2.layers[0][0].weight)


def test_sh_kd_with_unequal_widths_folds_q_into_the_teacher_head(tmp_path, teacher_file):
    res = execute(_sh_cfg(tmp_path / "r", teacher_file, **NARROW, **{"method.final": "th_kd", "method.th_weight": 1.0,
                                                                     "method.teacher_init": "scratch"}), "distill")
    d = res.run_dir
    state = torch.load(d / "checkpoint.pt", weights_only=True)["method"]
    q = nn.Linear(128, 32)
    q.load_state_dict({"weight": state["q.weight"], "bias": state["q.bias"]})
    head = nn.Linear(32, 10)
    head.load_state_dict({"weight": state["sh_head.weight"], "bias": state["sh_head.bias"]})
    s1, t2 = kdkit.load(d / "stage1_student.pt"), kdkit.load(d / "stage2_teacher.pt")
    assert torch.equal(head.weight, s1.classifier.weight)  # the stage-1 head, frozen through stage 2
    assert torch.allclose(t2.classifier.weight, s1.classifier.weight @ q.weight, atol=1e-6)
    assert "test_accuracy_teacher_head" in res.summary and res.summary["projector"]


def test_sh_kd_resume_after_stage_one_does_not_repeat_it(tmp_path, teacher_file, monkeypatch):
    ref = execute(_sh_cfg(tmp_path / "ref", teacher_file), "distill")
    steps_per_epoch = 20  # 1294 digits training images / batch 64
    cfg = _sh_cfg(tmp_path / "run", teacher_file)
    crash_at(cfg, 2 * steps_per_epoch + 5, monkeypatch)  # inside stage 2
    stage1 = (tmp_path / "run" / "stage1_student.pt").stat().st_mtime_ns
    res = execute(cfg, "distill", resume=True)
    assert (tmp_path / "run" / "stage1_student.pt").stat().st_mtime_ns == stage1
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(x["event"] == "epoch" and x["stage"] == "student" for x in lines) == 2
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sh_kd_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="apply to final=th_kd"):
        load_config(None, digits_overrides(tmp_path, **{"method.name": "sh_kd", "method.th_weight": 1.0}))


def test_sh_kd_stage2_is_the_authors_teacher_training(tmp_path, teacher_file):
    """Stage 2 trains the teacher on the whole labeled set (not the students' subset) with its own settings."""
    res = execute(_sh_cfg(tmp_path / "r", teacher_file, **{
        "data.train_subset": 10, "method.teacher_batch_size": 32,
        "method.teacher_optimizer": "{optimizer: sgd, lr: 0.01, schedule: constant}"}), "distill")
    s1, s2, s3 = res.summary["stages"]
    assert s1["steps_per_epoch"] == s3["steps_per_epoch"] == 1  # 100 images (10 per class), batch 64
    assert s2["steps_per_epoch"] == 1294 // 32 and s2["batch_size"] == 32  # every labeled training image
    assert s2["lr_end"] == {"teacher": 0.01} and s3["lr_end"]["student"] == 0.0
    with pytest.raises(ConfigError, match="teacher_optimizer: set epochs with teacher_epochs"):
        _sh_cfg(tmp_path / "x", teacher_file, **{"method.teacher_optimizer": "{epochs: 3}"})


def test_sh_kd_stage2_evaluates_the_teacher_in_eval_mode(tmp_path, cnn_teacher_file):
    """Validation of the stage-2 teacher must not run it in training mode: with BatchNorm, that would select the
    epoch on train-mode accuracy and let validation images overwrite the running statistics."""
    from kdkit.engine import evaluate

    m, _, _, data = build(tmp_path, cnn_teacher_file, method="sh_kd",
                          **{"student.arch": "vgg8_bn", "student.width": 0.0625})
    view = m.stages()[1].evaluate()
    m.teacher.train()  # as the engine leaves it during stage 2
    bn = next(x for x in m.teacher.modules() if isinstance(x, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    loader = BatchLoader(data.val, 64, shuffle=False, drop_last=False, mean=data.info.mean, std=data.info.std)
    evaluate(view, loader)
    assert torch.equal(bn.running_mean, before)
    assert m.teacher.training  # and training mode is restored afterwards


def test_th_kd_defaults_and_recipe_are_the_authors_weights():
    """train_student.py --distill kdth -r 1 -a 1.5 -b 0.02, T = 4: CE 1, KD 1.5, KD through the teacher's head
    0.02, and no CE through the teacher's head (not in the authors' code)."""
    from kdkit.methods.th_kd import THKDOptions

    o = THKDOptions()
    assert (o.ce_weight, o.kd_weight, o.th_weight, o.th_ce_weight, o.temperature) == (1.0, 1.5, 0.02, 0.0, 4.0)
    r = load_config(ROOT / "configs/mnist/th_kd.yaml").method.options
    assert (r.ce_weight, r.kd_weight, r.th_weight, r.th_ce_weight, r.temperature) == (1.0, 1.5, 0.02, 0.0, 4.0)
    # the authors' KDE sums over the batch; kdkit's l2 is that divided by the batch size
    a, b = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert embedding_distance(a, b, "kde").item() == pytest.approx(0.4 ** 2 + 0.8 ** 2)
    assert embedding_distance(a, b, "l2").item() == pytest.approx((0.4 ** 2 + 0.8 ** 2) / 2)
