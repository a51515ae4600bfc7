"""FitNets and attention transfer as methods: layer pairs by path, adapters from shapes, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.config import load_config
from kdkit.data import BatchLoader, load_data
from kdkit.errors import ModelError
from kdkit.losses import attention_map, kd_loss
from kdkit.methods import method_class
from kdkit.modelfile import build_from_config

from .conftest import digits_overrides, distill_run

STUDENT = {"student.arch": "vgg8_bn", "student.width": 0.0625}


def _method(tmp_path, teacher, **extra):
    cfg = load_config(None, digits_overrides(tmp_path, **{"teacher.checkpoint": str(teacher), **STUDENT, **extra}))
    data = load_data(cfg.data)
    t = build_from_config(cfg.teacher, data.info, "teacher").model
    s = build_from_config(cfg.student, data.info, "student").model
    m = method_class(cfg.method.name)(cfg.method.options, student=s, teacher=t, info=data.info, train=cfg.train)
    batch = next(iter(BatchLoader(data.train, 16, shuffle=True, drop_last=True, mean=data.info.mean,
                                  std=data.info.std)))
    m.setup(batch)
    return m, batch


def test_fitnets_default_pair_adapter_and_loss_value(tmp_path, cnn_teacher_file):
    m, batch = _method(tmp_path, cnn_teacher_file, **{"method.name": "fitnets", "method.kd_weight": 0.5})
    assert m.pairs == [("stage3", "stage3")]  # the middle of five stages
    adapter = m.pair_losses[0].adapter
    assert adapter.kind == "conv_bn" and adapter.map[0].in_channels == 16 and adapter.map[0].out_channels == 32
    m.train()
    losses = m.student_step(batch)
    # recompute every term by hand from the same models
    with torch.no_grad():
        feats = {}
        h1 = m.teacher.stage3.register_forward_hook(lambda mod, i, o: feats.__setitem__("t", o))
        h2 = m.student.stage3.register_forward_hook(lambda mod, i, o: feats.__setitem__("s", o))
        t_logits, s_logits = m.teacher(batch.x), m.student(batch.x)
        h1.remove()
        h2.remove()
        hint = F.mse_loss(adapter(feats["s"]), feats["t"])
    assert losses["hint"].item() == pytest.approx(100.0 * hint.item(), rel=1e-4)
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(s_logits, batch.y).item(), rel=1e-5)
    assert losses["kd"].item() == pytest.approx(0.5 * kd_loss(s_logits, t_logits, 4.0).item(), rel=1e-5)


def test_attention_pairs_every_stage_and_matches_hand_value(tmp_path, cnn_teacher_file):
    m, batch = _method(tmp_path, cnn_teacher_file, **{"method.name": "attention"})
    assert [p[0] for p in m.pairs] == ["stage1", "stage2", "stage3", "stage4", "stage5"]
    m.train()
    losses = m.student_step(batch)
    with torch.no_grad():
        total = 0.0
        xs, xt = batch.x, batch.x
        for name in ("stage1", "stage2", "stage3", "stage4", "stage5"):
            xs, xt = getattr(m.student, name)(xs), getattr(m.teacher, name)(xt)
            total += (attention_map(xs) - attention_map(xt)).pow(2).mean().item()
    assert losses["at"].item() == pytest.approx(1000.0 * total, rel=1e-4)


def test_fitnets_and_attention_train_end_to_end(tmp_path, cnn_teacher_file):
    for name in ("fitnets", "attention"):
        res = distill_run(tmp_path / name, cnn_teacher_file, **{"method.name": name, "train.epochs": 2, **STUDENT})
        assert res.summary["method"] == name and res.summary["test_accuracy"] > 0.3
        assert res.summary["params"] == sum(p.numel() for p in res.model.parameters())  # adapters not exported


def test_layer_pairs_by_path_on_a_user_student(tmp_path, cnn_teacher_file):
    user = {"student.arch": None, "student.module": "tests.user_models:TinyConvNet"}
    res = distill_run(tmp_path / "ok", cnn_teacher_file, **{
        **user, "method.name": "fitnets", "method.pairs": "[[features.4, stage1]]", "train.epochs": 3})
    assert res.summary["test_accuracy"] > 0.1
    with pytest.raises(ModelError, match=r"spatial size of student layer 'features.2' \(2, 8, 16, 16\) differs from "
                                         r"teacher layer 'stage1' \(2, 8, 8, 8\)"):
        distill_run(tmp_path / "bad", cnn_teacher_file, **{**user, "method.name": "fitnets",
                                                            "method.pairs": "[[features.2, stage1]]"})


def test_unknown_layer_fails_before_training_with_closest_paths(tmp_path, cnn_teacher_file):
    with pytest.raises(ModelError, match=r"no module 'stage3.9'; closest: .*stage3\.0"):
        distill_run(tmp_path / "r", cnn_teacher_file, **{"method.name": "fitnets",
                                                          "method.pairs": "[[stage3.9, stage3]]", **STUDENT})
    assert not (tmp_path / "r").exists()


def test_user_models_without_stages_need_pairs(tmp_path, cnn_teacher_file):
    with pytest.raises(ModelError, match="give method.pairs"):
        distill_run(tmp_path / "r", cnn_teacher_file, **{"method.name": "attention", "student.arch": None,
                                                          "student.module": "tests.user_models:TinyConvNet"})


def test_kd_normalize_divides_the_kd_term_by_its_running_mean(tmp_path, teacher_file):
    from kdkit.losses import kd_loss

    from .test_head_sharing import build

    m, batch, *_ = build(tmp_path, teacher_file, method="kd", **{"method.kd_normalize": True, "student.arch": "mlp",
                                                                 "student.hidden": "[32]"})
    m.train()
    first = m.student_step(batch)["kd"]
    assert first.item() == pytest.approx(0.9)  # the first value starts the mean: kd_weight * 1
    with torch.no_grad():
        raw = kd_loss(m.student(batch.x), m.teacher(batch.x), 4.0).item()
    assert m.kd_normalizer.mean.item() == pytest.approx(raw, rel=1e-5)
    state = m.checkpoint_state()
    assert "kd_normalizer.mean" in state  # resumed runs continue the same mean


def test_kd_anneal_cosine_scales_the_kd_term_by_the_epoch(tmp_path, teacher_file):
    from .test_head_sharing import build

    m, batch, *_ = build(tmp_path, teacher_file, method="kd", **{"method.kd_anneal": "cosine", "train.epochs": 4,
                                                                 "student.arch": "mlp", "student.hidden": "[32]"})
    m.train()
    with torch.no_grad():
        raw = kd_loss(m.student(batch.x), m.teacher(batch.x), 4.0).item()
    assert m.student_step(batch)["kd"].item() == pytest.approx(0.9 * raw, rel=1e-5)  # epoch 0: full weight
    (stage,) = m.stages()
    assert stage.on_epoch_end(0) == {"kd_anneal": 1.0} and stage.on_epoch_end(1)["kd_anneal"] == pytest.approx(
        (1 + math.cos(math.pi / 4)) / 2)
    # epoch 2 of 4: (1 + cos(pi / 2)) / 2 = 0.5
    assert m.student_step(batch)["kd"].item() == pytest.approx(0.5 * 0.9 * raw, rel=1e-5)
    assert int(m.checkpoint_state()["epochs_done"]) == 2  # a resumed run anneals from where it stopped
    plain, *_ = build(tmp_path / "plain", teacher_file, method="kd", **{"student.arch": "mlp",
                                                                         "student.hidden": "[32]"})
    assert "epochs_done" not in plain.checkpoint_state() and plain.stages()[0].on_epoch_end is None
