"""Data-free distillation: loss terms against hand values, the exponential penalisation, reference refresh,
BatchNorm statistics, collapse detection, the generator, and tiny end-to-end runs of every method."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.cli import main
from kdkit.config import TrainConfig, load_config
from kdkit.data import DataInfo
from kdkit.diagnostics import inspect_samples
from kdkit.errors import ModelError, RunWarning
from kdkit.generators import DAFLGenerator, load_generator, upsample2x
from kdkit.losses.datafree import (
    BNStatistics,
    activation_loss,
    clamped_mean_kl,
    diversity_seeking_loss,
    exp_penalty,
    information_entropy_loss,
    js_divergence,
    l1_logit_distance,
    one_hot_loss,
    total_variation,
)
from kdkit.methods.rdskd import RDSKD, RDSKDOptions
from kdkit.run import execute

from .conftest import ROOT, crash_at, digits_overrides

# ------------------------------------------------------------------------------- loss terms by hand


def test_one_hot_loss_is_ce_to_the_argmax():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    lse0 = math.log(math.exp(2) + math.exp(1) + 1)
    lse1 = math.log(2 + math.exp(3))
    assert one_hot_loss(logits).item() == pytest.approx(((lse0 - 2) + (lse1 - 3)) / 2, rel=1e-6)


def test_information_entropy_loss_by_hand():
    # p rows: softmax([ln 3, 0]) = [.75, .25] and [.25, .75] -> pbar = [.5, .5] -> sum pbar log pbar = -ln 2
    logits = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]])
    assert information_entropy_loss(logits).item() == pytest.approx(-math.log(2), rel=1e-6)
    assert information_entropy_loss(logits, base=10).item() == pytest.approx(-math.log10(2), rel=1e-6)
    # one sample: pbar = [.75, .25]
    want = 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    assert information_entropy_loss(logits[:1]).item() == pytest.approx(want, rel=1e-6)


def test_activation_loss_and_l1_distance_by_hand():
    f = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert activation_loss(f).item() == pytest.approx(-2.5)
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 5.0]])
    assert l1_logit_distance(s, t).item() == pytest.approx(2.0)


def test_diversity_seeking_loss_by_hand():
    x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])  # ||x2 - x1|| = 2
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # p1 = [.5, .5], p2 = [.75, .25]
    ratio = 2.0 / math.sqrt(2 * 0.25**2)
    assert diversity_seeking_loss(x, logits).item() == pytest.approx(1 / ratio, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        diversity_seeking_loss(x[:1], logits[:1])


def test_total_variation_and_js_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # horizontal: -1, -2; vertical: -2, -3; diagonal (x[1,0]-x[0,1]) = 1; (x[0,0]-x[1,1]) = -4
    want_l2 = math.sqrt(1 + 4) + math.sqrt(4 + 9) + 1 + 4
    assert total_variation(x, "l2").item() == pytest.approx(want_l2, rel=1e-6)
    assert total_variation(x, "l1").item() == pytest.approx(1.5 + 2.5 + 1 + 4, rel=1e-6)
    p = torch.tensor([[1.0, 0.0]])
    assert js_divergence(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(p, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(math.log(2), rel=1e-5)


def test_exp_penalty_gradient_is_exp_times_the_terms_gradient():
    w = torch.tensor([0.3, -0.7], requires_grad=True)
    ref = torch.tensor(0.2, requires_grad=True)
    term = (w**2).sum() + w[0]
    out = exp_penalty(term, ref)
    out.backward()
    factor = math.exp(term.item() - 0.2)
    want = factor * torch.tensor([2 * 0.3 + 1, 2 * -0.7])
    assert torch.allclose(w.grad, want, atol=1e-6)
    assert ref.grad is None  # the reference is detached: no gradient flows into it


# ------------------------------------------------------------------------------- BatchNorm statistics


def test_bn_statistics_zero_when_the_batch_matches_the_running_statistics():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():  # set each BN's running statistics to what this batch gives it
        h = net[0](x)
        net[1].running_mean.copy_(h.mean((0, 2, 3)))
        net[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
        h = net[3](net[2](net[1](h)))
        net[4].running_mean.copy_(h.mean((0, 2, 3)))
        net[4].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    stats = BNStatistics(net)
    net(x)
    assert stats.loss.item() == pytest.approx(0.0, abs=1e-5)
    stats.clear()
    net(x + 1.0)  # shifted inputs: layer 1's mean moves by conv-weight sums, so the loss is positive
    h = net[0](x + 1.0)
    want1 = (torch.linalg.vector_norm(h.mean((0, 2, 3)) - net[1].running_mean)
             + torch.linalg.vector_norm(h.var((0, 2, 3), unbiased=False) - net[1].running_var))
    assert stats.terms[0].item() == pytest.approx(want1.item(), rel=1e-4)
    assert stats.loss.item() > 0.1
    stats.clear()
    stats.enabled = False
    net(x)
    assert stats.terms == []
    stats.remove()


# ------------------------------------------------------------------------------- collapse detection


def test_collapse_detection_fires_on_a_collapsed_batch_and_not_on_a_diverse_one():
    torch.manual_seed(0)
    same = torch.randn(1, 1, 8, 8).repeat(64, 1, 1, 1) + 1e-4 * torch.randn(64, 1, 8, 8)
    one_class = torch.zeros(64, 10)
    one_class[:, 3] = 5.0
    d = inspect_samples(same, one_class, max_class_fraction=0.5, min_diversity=0.1)
    assert len(d["collapse"]) == 2 and d["class_histogram"][3] == 64 and d["class_entropy"] == pytest.approx(0.0)
    diverse = torch.randn(64, 1, 8, 8)
    logits = F.one_hot(torch.arange(64) % 10, 10).float() * 5
    d = inspect_samples(diverse, logits, max_class_fraction=0.5, min_diversity=0.1)
    assert d["collapse"] == [] and d["class_entropy"] > 0.99 and d["diversity"] > 1.0


# ------------------------------------------------------------------------------- the generator


def test_upsample_equals_interpolate_forward_and_backward():
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    a, b = upsample2x(x), F.interpolate(y, scale_factor=2)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_generator_shapes_sampling_and_errors():
    g = DAFLGenerator((1, 28, 28), latent_dim=8, width=8)
    assert g(torch.randn(4, 8)).shape == (4, 1, 28, 28)
    g.train()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    g.sample(16, batch_stats=True)
    after = g.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # sampling never moves running statistics
    assert g.training
    with pytest.raises(ModelError, match="multiple of 4"):
        DAFLGenerator((1, 30, 30))


def test_adaptive_deepinversion_competition_terms_by_hand():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])
    # the authors': clamp p, q, m = (p+q)/2 to [.01, .99]: p = [.5, .5], q = [.99, .01], m = [.75, .25]
    kl_mp = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl_mq = 0.75 * math.log(0.75 / 0.99) + 0.25 * math.log(0.25 / 0.01)
    assert clamped_mean_kl(p, q).item() == pytest.approx((kl_mp + kl_mq) / 2, rel=1e-5)  # 0.3637
    # the true JS runs the KLs the other way, on the unclamped distributions
    js = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * (1.0 * math.log(1.0 / 0.75))
    assert js_divergence(p, q).item() == pytest.approx(js, rel=1e-5)


def test_dafl_reads_the_first_fully_connected_layers_input_and_dfad_has_its_own_bn_eps():
    from kdkit.methods import method_class
    from kdkit.models import create

    info = DataInfo("mnist", [str(i) for i in range(10)], (1, 28, 28), [0.0], [1.0])
    made = {}
    for name in ("dafl", "dfad"):
        cls = method_class(name)
        made[name] = cls(cls.Options(), student=create("lenet5_half", in_channels=1, input_size=28),
                         teacher=create("lenet5", in_channels=1, input_size=28), info=info, train=TrainConfig())
    dafl = made["dafl"]
    assert dafl.feature_path == "embed.0:input"  # LeNet-5's 120-d conv3 output, as DAFL's code; not fc1's 84-d
    dafl.teacher(torch.randn(2, 1, 28, 28))
    assert dafl.teacher_taps[dafl.feature_path].shape == (2, 120)
    eps = {n: [b.eps for b in m.generator.modules() if isinstance(b, nn.BatchNorm2d)][1:3] for n, m in made.items()}
    assert eps == {"dafl": [0.8, 0.8], "dfad": [1e-5, 1e-5]}


# ------------------------------------------------------------------------------- RDSKD's references


def _rdskd(teacher_file: Path, **opts: object) -> RDSKD:
    from kdkit.modelfile import load

    teacher = load(teacher_file)
    info = DataInfo("digits", [str(i) for i in range(10)], (1, 16, 16), [0.0], [1.0])
    student = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    o = RDSKDOptions(**{"generator_width": 8, "latent_dim": 8, **opts})
    return RDSKD(o, student=student, teacher=teacher, info=info, train=TrainConfig(batch_size=16))


def test_rdskd_references_are_detached_and_refreshed_on_schedule(teacher_file):
    torch.manual_seed(0)
    m = _rdskd(teacher_file, ref_interval=3)
    seen = []
    for _ in range(8):
        before = (m.ref_oh.clone(), m.ref_ie.clone())
        out = m.generator_step(None)
        seen.append((before, out["one_hot"].item(), out["entropy"].item()))
        assert not m.ref_oh.requires_grad and not m.ref_ie.requires_grad
    # zero until step 1 takes its snapshot; then each snapshot holds until steps 4 and 7 (1 + 3k)
    assert seen[0][0][0].item() == 0.0 and seen[1][0][0].item() == 0.0
    for step in (2, 3, 4):
        assert seen[step][0][0].item() == pytest.approx(seen[1][1]) and seen[step][0][1].item() == pytest.approx(
            seen[1][2])
    assert seen[5][0][0].item() == pytest.approx(seen[4][1])
    assert seen[7][0][0].item() == pytest.approx(seen[4][1])
    assert m.ref_oh.item() == pytest.approx(seen[7][1])


def test_rdskd_generator_loss_is_the_penalised_sum(teacher_file):
    torch.manual_seed(1)
    m = _rdskd(teacher_file, ref_interval=100)
    m.ref_oh.fill_(0.3)
    m.ref_ie.fill_(-1.0)
    torch.manual_seed(5)
    out = m.generator_step(None)
    want = math.exp(out["one_hot"].item() - 0.3) + math.exp(out["entropy"].item() + 1.0) + out["diversity"].item()
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)


def test_generator_ema_follows_the_moving_average_and_makes_half_the_student_batch(teacher_file):
    """MAD's EMA generator: after a generator step, G_ema = m G_ema + (1 - m) G (weights and BatchNorm running
    statistics; counts copied), and the last half of each student batch is made by G_ema."""
    torch.manual_seed(0)
    m = _rdskd(teacher_file, generator_ema=0.9, schedule="joint")
    assert m.generator_update(m.generator_step).after_step == m.update_ema
    assert _rdskd(teacher_file).generator_update(None).after_step is None  # off by default
    old = {k: v.clone() for k, v in m.generator_ema.state_dict().items()}
    m.generator_step(None)  # moves the generator's running statistics; weights moved by hand below
    with torch.no_grad():
        for p in m.generator.parameters():
            p.add_(torch.randn_like(p))
    m.update_ema()
    new, gen = m.generator_ema.state_dict(), m.generator.state_dict()
    for k in old:
        if old[k].is_floating_point():
            assert torch.allclose(new[k], 0.9 * old[k] + 0.1 * gen[k], atol=1e-6), k
        else:
            assert torch.equal(new[k], gen[k]), k
    assert any(not torch.equal(new[k], gen[k]) for k in new if new[k].is_floating_point())
    with torch.no_grad():  # an EMA generator with zero weights makes one constant image: its half is visible
        for p in m.generator_ema.parameters():
            p.zero_()
    x, t = m.student_batch()
    assert x.shape[0] == t.shape[0] == 16
    assert x[8:].std(0).max().item() == 0.0 and x[:8].std(0).max().item() > 0.0
    assert torch.allclose(t[8:], m.teacher(x[8:]), atol=1e-5)


def test_a_student_that_gives_one_class_to_every_image_is_reported_once(teacher_file):
    """The student's watch: epochs count only when the student trained; one class for every image while the
    teacher gives several, STUCK_EPOCHS epochs in a row, warns once (naming the option to act on) and is kept
    in the summary; an epoch with several classes resets the count; a teacher giving one class never counts."""
    m = _rdskd(teacher_file)
    x = torch.randn(8, 1, 16, 16)
    several = torch.eye(10)[torch.arange(8) % 3]  # the teacher's logits: classes 0, 1, 2
    stuck_student = m.student[1]
    with torch.no_grad():
        stuck_student.weight.zero_()
        stuck_student.bias.copy_(torch.eye(10)[7])  # class 7 for every image

    def epoch(e: int, teacher_logits: torch.Tensor = several, trained: bool = True) -> dict:
        m.image_counts["distilled"] += 32 if trained else 0
        return m.watch_student("distill", e, x, teacher_logits)

    assert epoch(0) == {"student/agreement": 0.0, "student/classes": 1}
    epoch(1, trained=False)  # no student step this epoch (e.g. an inversion phase): not counted
    epoch(2, teacher_logits=torch.eye(10)[torch.zeros(8, dtype=torch.long)])  # the teacher too: not a symptom
    assert m.student_watch["single_class_epochs"] == 0
    epoch(3)
    with torch.no_grad():
        stuck_student.weight.normal_()  # the student moves again: the count starts over
    assert epoch(4)["student/classes"] > 1 and m.student_watch["single_class_epochs"] == 0
    with torch.no_grad():
        stuck_student.weight.zero_()
    epoch(5)
    epoch(6)
    with pytest.warns(RunWarning, match=r"epoch 8: the student is not learning: it has given class 7 to every "
                                        r"generated image for 3 epochs while the teacher gives 3 classes.*train.lr"):
        epoch(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        epoch(8)
    assert m.summary()["student_stuck"] == {"stage": "distill", "epoch": 8, "class": 7, "epochs": 3}
    assert m.student.training  # the watch puts the student back in the mode it found


# ------------------------------------------------------------------------------- end to end


def _datafree(out: Path, teacher: Path, method: str, **extra: object):
    return execute(_datafree_config(out, teacher, method, **extra), "distill")


def _datafree_config(out: Path, teacher: Path, method: str, **extra: object):
    """A tiny data-free run's config on the digits: an MLP student, 8 steps an epoch, no validation split."""
    o = {"teacher.checkpoint": str(teacher), "student.arch": "mlp", "student.hidden": "[32]", "method.name": method,
         "method.steps_per_epoch": 8, "data.val_split": 0, "train.select": "last", "train.batch_size": 32,
         "method.diagnostics_samples": 64, "method.grid_images": 16}
    if method != "deepinversion":
        o.update({"method.generator_width": 16, "method.latent_dim": 16})
    o.update(extra)
    return load_config(None, digits_overrides(out, **o))


@pytest.mark.parametrize("method,extra", [
    ("rdskd", {"method.generator_epochs": 1}),
    ("rdskd", {"method.schedule": "joint", "method.bank_size": 128}),
    ("dafl", {}),
    ("dfad", {"method.student_steps": 2}),
    ("dfad", {"method.student_steps": 2, "method.generator_ema": 0.9}),
])
def test_generator_methods_end_to_end(tmp_path, teacher_file, method, extra):
    r = _datafree(tmp_path / "run", teacher_file, method, **extra)
    s = r.summary
    assert s["data"]["train"] == 0
    assert s["test_accuracy"] > 0.15  # chance is 0.10: the student learned from generated images alone
    assert s["generator_file"] == "generator.pt" and (r.run_dir / "generator.pt").is_file()
    assert len(list((r.run_dir / "samples").glob("*.png"))) >= 2
    epochs = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    assert all(sum(e["gen/class_histogram"]) == 64 and 0 <= e["gen/class_entropy"] <= 1 for e in epochs)
    assert all(0 <= e["student/agreement"] <= 1 and e["student/classes"] >= 1 for e in epochs)
    assert s["student_stuck"] is None
    gen, meta = load_generator(r.run_dir / "generator.pt")
    assert gen.sample(4).shape == (4, 1, 16, 16) and meta["method"] == method


@pytest.mark.parametrize("method,extra,made,seen", [
    # two epochs of 8 steps at batch 32; DFAD: 2 student steps per step, each on a fresh batch
    ("dfad", {"method.student_steps": 2}, 2 * 8 * 2 * 32, 2 * 8 * 2 * 32),
    # joint RDSKD: one generator batch per step, kept in the bank; the student takes 2 steps from the bank
    ("rdskd", {"method.schedule": "joint", "method.bank_size": 128, "method.student_steps": 2}, 2 * 8 * 32,
     2 * 8 * 2 * 32),
])
def test_runs_count_the_synthetic_images_made_and_distilled(tmp_path, teacher_file, method, extra, made, seen):
    r = _datafree(tmp_path / "run", teacher_file, method, **{"train.epochs": 2, **extra})
    assert r.summary["synthetic_images"] == {"synthesised": made, "distilled": seen}
    epochs = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["images/distilled"] for e in epochs if e["event"] == "epoch"] == [seen // 2, seen]


def test_datafree_runs_never_open_the_training_set(tmp_path, monkeypatch):
    """A dataset whose training files are missing: a data-free run reads the test files only."""
    from kdkit.data import idx

    from .test_data import write_mnist

    root = tmp_path / "mnist"
    write_mnist(root, n_train=100, n_test=40)
    teacher = execute(load_config(None, digits_overrides(
        tmp_path / "teacher", **{"data.name": "mnist", "data.root": str(root), "model.arch": "mlp",
                                 "model.hidden": "[16]", "train.epochs": 1}), default_method="supervised"), "train")
    for f in root.glob("train-*"):
        f.unlink()
    opened = []
    real = idx._split
    monkeypatch.setattr(idx, "_split", lambda r, name, split: opened.append(split) or real(r, name, split))
    r = _datafree(tmp_path / "run", teacher.run_dir / "model.pt", "dafl",
                  **{"data.name": "mnist", "data.root": str(root), "train.epochs": 1})
    assert opened == ["test"] and r.summary["data"] == {**r.summary["data"], "train": 0, "val": 0, "test": 40}
    # the normalisation is the teacher's, recorded in its model file, not the test set's
    assert r.summary["test_accuracy"] >= 0


def test_deepinversion_end_to_end_and_adaptive(tmp_path, cnn_teacher_file):
    for name, extra in (("di", {}), ("adi", {"method.competition_weight": 1.0})):
        r = _datafree(tmp_path / name, cnn_teacher_file, "deepinversion",
                      **{"method.batches": 2, "method.iterations": 20, **extra})
        s = r.summary
        assert s["synthetic_images"] == 64 and [h["stage"] for h in s["stages"]] == [
            "synthesise 1/2", "synthesise 2/2", "distill"]
        synth = torch.load(r.run_dir / "synthetic.pt", weights_only=True)
        assert synth["images"].shape == (64, 1, 16, 16)


def test_deepinversion_optimises_the_pixels_towards_the_targets(tmp_path, cnn_teacher_file):
    # the authors' w_bn = 100 is tuned for 2,000 steps on CIFAR; 100 steps on this tiny teacher need less
    r = _datafree(tmp_path / "di", cnn_teacher_file, "deepinversion",
                  **{"method.batches": 1, "method.iterations": 100, "method.bn_weight": 1.0, "train.epochs": 1,
                     "train.log_every": 10})
    lines = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    ce = [x["train/ce"] for x in lines if x["event"] == "step" and x["stage"].startswith("synth")]
    bn = [x["train/bn"] for x in lines if x["event"] == "step" and x["stage"].startswith("synth")]
    assert ce[-1] < 0.6 * ce[0] and bn[-1] < 0.6 * bn[0]
    from kdkit.modelfile import load

    teacher = load(cnn_teacher_file)
    synth = torch.load(r.run_dir / "synthetic.pt", weights_only=True)
    hits = (teacher(synth["images"]).argmax(1) == synth["targets"]).float().mean().item()
    assert hits > 0.8, (ce, hits)  # random pixels start near chance (0.1)


def test_deepinversion_keeps_the_last_iterate_like_the_authors_or_the_best(tmp_path, cnn_teacher_file):
    kept = {}
    for keep in ("last", "best"):
        r = _datafree(tmp_path / keep, cnn_teacher_file, "deepinversion",
                      **{"method.batches": 1, "method.iterations": 30, "method.keep": keep, "train.epochs": 1})
        m = r.method
        kept[keep] = (torch.equal(m.best[0], m.images[0].detach()), float(m.best_cost[0]))
    assert kept["last"] == (True, math.inf)  # the final pixels; no cost tracked
    assert kept["best"][0] is False and kept["best"][1] < math.inf


def test_deepinversion_needs_batchnorm(tmp_path, teacher_file):
    with pytest.raises(ModelError, match="needs a teacher with BatchNorm.*use rdskd, dafl or dfad"):
        _datafree(tmp_path / "run", teacher_file, "deepinversion")


def test_restart_on_collapse_reinitialises_and_reports(tmp_path, teacher_file, monkeypatch):
    from kdkit.engine import trainer
    from kdkit.methods.datafree import DataFree

    seen = []  # at each restart: how many generator parameters still had Adam state, before and after
    real = trainer._forget

    def watch(optimizers, params):
        def with_state():
            return sum(p in o.state for o in optimizers for p in params)

        before = with_state()
        real(optimizers, params)
        seen.append((before, with_state()))

    monkeypatch.setattr(trainer, "_forget", watch)
    with pytest.warns(RunWarning, match="epoch 1: the generated images collapsed.*re-initialised"):
        r = _datafree(tmp_path / "run", teacher_file, "dafl", **{"method.collapse_min_diversity": 100.0,
                                                                 "method.on_collapse": "restart"})
    n_gen = len(list(r.method.generator.parameters()))
    assert seen == [(n_gen, 0), (n_gen, 0)] and isinstance(r.method, DataFree)
    s = r.summary
    assert len(s["collapse_events"]) == 2 and s["collapsed_at_end"]
    assert all("re-initialised" in e["action"] for e in s["collapse_events"])
    assert "near-identical" in s["collapse_events"][0]["reasons"][0]
    card = s["report_card"]["generator_collapse"]
    assert card["events"] == 2 and card["handling"] == "restart" and card["collapsed_at_end"]
    assert s["report_card"]["student_stuck"] is None
    from kdkit.report import card_lines
    text = "\n".join(card_lines(s["report_card"]))
    assert ("The generator collapsed 2 time(s) (method.on_collapse=restart; done: generator re-initialised "
            "(method.on_collapse=restart)); still collapsed at the end.") in text
    assert "not learning" not in text
    stuck = {**s["report_card"], "student_stuck": {"stage": "distill", "epoch": 8, "class": 7, "epochs": 3}}
    assert "gave class 7 to every generated image for 3 epochs ([distill] epoch 8)" in "\n".join(card_lines(stuck))


def test_collapse_can_stop_training_and_restarts_are_bounded(tmp_path, teacher_file):
    """on_collapse=stop ends training after the epoch that collapsed, keeping the model so far, and says so in
    the summary; with restart, after collapse_restarts re-initialisations the next collapse stops training."""
    base = {"method.collapse_min_diversity": 100.0, "train.epochs": 4}  # every epoch looks collapsed
    with pytest.warns(RunWarning, match="training stops here"):
        r = _datafree(tmp_path / "stop", teacher_file, "dafl", **base, **{"method.on_collapse": "stop"})
    s = r.summary
    assert s["stopped_by"].startswith("generator collapse") and s["reached"]["epoch"] == 1
    assert s["stages"][0]["completed"] is False and len(s["collapse_events"]) == 1
    assert s["selected"]["epoch"] == 0  # the collapse came in the first epoch: the model before training
    with pytest.warns(RunWarning, match="re-initialised 2 time"):
        r = _datafree(tmp_path / "bounded", teacher_file, "dafl", **base,
                      **{"method.on_collapse": "restart", "method.collapse_restarts": 2})
    s = r.summary
    assert [e["action"].split(" ")[0] for e in s["collapse_events"]] == ["generator", "generator", "training"]
    assert s["reached"]["epoch"] == 3 and s["stopped_by"].startswith("generator collapse")
    assert s["selected"]["epoch"] == 2


def test_a_collapsed_epoch_resumed_mid_way_is_kept_and_said(tmp_path, teacher_file, monkeypatch):
    """Resumed from a checkpoint inside the epoch that collapses, the state before that epoch is not known:
    the run keeps the epoch and says so, instead of putting back something else."""
    _collapse_at(2, monkeypatch)
    cfg = _datafree_config(tmp_path / "cut", teacher_file, "dafl", **{
        "method.grid_images": 0, "train.epochs": 3, "train.checkpoint_every": 3, "method.on_collapse": "stop"})
    crash_at(cfg, 14, monkeypatch)  # in epoch 2 (global steps 8-15), after a checkpoint inside it
    with pytest.warns(RunWarning) as caught:
        s = execute(cfg, "distill", resume=True).summary
    said = [str(w.message) for w in caught]
    assert any("epoch 2: the generated images collapsed" in m for m in said)
    assert any("epoch 2 is kept although training stopped because of it (generator collapse at joint epoch 2): it "
               "was resumed from a checkpoint within it" in m for m in said)
    assert s["selected"]["epoch"] == 2 and s["reached"]["epoch"] == 2 and "discarded_epoch" not in s["stages"][0]
    assert s["collapse_events"][0]["action"] == "training stopped" and s["collapsed_at_end"]


def _collapse_at(epoch: int, monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """Make the generated images look collapsed at `epoch` (1-based) only; returns the method's trainable
    state at the end of every epoch (before a collapse is acted on), filled as the run goes."""
    from kdkit.methods import datafree

    seen: dict[int, dict[str, torch.Tensor]] = {}
    real_diagnose, real_inspect = datafree.DataFree.diagnose, datafree.inspect_samples

    def diagnose(self, stage, e):
        seen[e + 1] = {k: v.detach().clone() for k, v in self.checkpoint_state().items()}
        return real_diagnose(self, stage, e)

    def inspect(images, logits, **kw):
        d = real_inspect(images, logits, **kw)
        return {**d, "collapse": ["forced by the test"]} if max(seen) == epoch else d

    monkeypatch.setattr(datafree.DataFree, "diagnose", diagnose)
    monkeypatch.setattr(datafree, "inspect_samples", inspect)
    return seen


def test_stop_on_collapse_discards_the_collapsed_epoch(tmp_path, teacher_file, monkeypatch):
    """on_collapse=stop puts the student and generator back as they were after the epoch before the collapse:
    the summary keeps that epoch (its validation accuracy), and the test accuracy is that model's."""
    seen = _collapse_at(3, monkeypatch)
    with pytest.warns(RunWarning, match="epoch 3: the generated images collapsed.*put back as they were"):
        r = _datafree(tmp_path / "run", teacher_file, "dafl", **{"train.epochs": 5, "data.val_split": 200,
                                                                 "method.on_collapse": "stop"})
    assert sorted(seen) == [1, 2, 3]
    state = r.method.checkpoint_state()
    assert all(torch.equal(state[k], seen[2][k]) for k in seen[2])
    assert not all(torch.equal(seen[3][k], seen[2][k]) for k in seen[2])  # epoch 3 did train
    s, st = r.summary, r.summary["stages"][0]
    epochs = [x for x in map(json.loads, (r.run_dir / "metrics.jsonl").read_text().splitlines())
              if x["event"] == "epoch"]
    assert [e.get("discarded") for e in epochs] == [None, None, True]
    assert st["reached"]["epoch"] == 3 and st["discarded_epoch"] == 3 and st["selected_epoch"] == 2
    assert st["val_accuracy"] == epochs[1]["val/accuracy"] != epochs[2]["val/accuracy"]
    assert s["reached"]["epoch"] == 3 and s["selected"]["epoch"] == 2
    assert s["stopped_by"] == "generator collapse at joint epoch 3"
    assert s["collapse_events"][0]["action"] == "training stopped, the collapsed epoch discarded"
    assert not s["collapsed_at_end"] and s["final_diagnostics"]["epoch"] == 2
    from kdkit.report import card_lines

    assert ("The generator collapsed 1 time(s) (method.on_collapse=stop; done: training stopped, the collapsed "
            "epoch discarded); not collapsed at the end.") in card_lines(s["report_card"])
    saved = torch.load(r.run_dir / "generator.pt", weights_only=False)
    assert all(torch.equal(v, seen[2][f"generator.{k}"]) for k, v in saved["state_dict"].items())
    from kdkit.modelfile import load

    exported = load(r.run_dir / "model.pt").state_dict()  # the model file, scored for test_accuracy, is epoch 2's
    assert all(torch.equal(v, seen[2][f"student.{k}"]) for k, v in exported.items())


def test_datafree_resume_is_bit_identical(tmp_path, teacher_file, monkeypatch):
    extra = {"method.schedule": "joint", "method.bank_size": 96, "train.epochs": 2, "train.checkpoint_every": 3,
             "train.deterministic": True, "method.collapse_min_diversity": 100.0,  # a collapse event per epoch
             "method.generator_ema": 0.5}  # the EMA generator is checkpointed too
    full = _datafree(tmp_path / "full", teacher_file, "rdskd", **extra)
    cfg = _datafree_config(tmp_path / "cut", teacher_file, "rdskd", **extra)
    crash_at(cfg, 11, monkeypatch)
    resumed = execute(cfg, "distill", resume=True)
    a, b = full.method.state_dict(), resumed.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("teacher."))
    # the events of the epoch before the crash come back from the checkpoint
    assert len(full.summary["collapse_events"]) == 2
    assert resumed.summary["collapse_events"] == full.summary["collapse_events"]
    assert resumed.summary["final_diagnostics"] == full.summary["final_diagnostics"]
    assert resumed.summary["synthetic_images"] == full.summary["synthetic_images"]


def test_kdkit_sample_cli(tmp_path, teacher_file, capsys):
    r = _datafree(tmp_path / "run", teacher_file, "dfad", **{"train.epochs": 1})
    assert main(["sample", str(r.run_dir), "-n", "9", "--tensors", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["png"]).is_file() and out["images"] == 9
    assert torch.load(out["tensors"], weights_only=True).shape == (9, 1, 16, 16)
    assert main(["sample", str(tmp_path)]) == 2
    assert "holds no generator.pt" in capsys.readouterr().err


def test_time_budget_stops_and_snapshots_are_scored(tmp_path, teacher_file):
    r = _datafree(tmp_path / "run", teacher_file, "rdskd",
                  **{"method.generator_epochs": 1, "train.epochs": 3, "train.time_budget_min": 1e-6,
                     "train.snapshot_min": "[1e-7,100]"})
    s = r.summary
    assert s["stopped_by_time_budget"] and s["stages"][-1] == {"stage": "student",
                                                               "skipped": "train.time_budget_min reached"}
    assert s["stages"][0]["epochs"] == 1
    snaps = s["snapshots"]
    assert snaps[0]["minutes"] == 1e-7 and "final_model" not in snaps[0]
    assert snaps[1]["final_model"] and snaps[1]["test_accuracy"] == s["test_accuracy"]


# ------------------------------------------------------------------------------- the papers' GPU recipes


def _write_svhn_test(root: Path, n: int = 16) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    savemat(root / "test_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                      "y": (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)})


@pytest.mark.parametrize("recipe", ["cifar10/rdskd", "cifar10/dafl", "cifar10/dfad", "cifar10/deepinversion",
                                    "svhn/rdskd"])
def test_gpu_protocol_recipes_run_a_few_steps(tmp_path, recipe):
    """The papers' protocols with their real architectures (ResNet-34 -> 18, WRN-40-2 -> 16-1) for two steps
    per stage, on test files written here (a data-free run reads no training file) and an untrained teacher."""
    from kdkit.config import ModelConfig
    from kdkit.modelfile import save_model
    from kdkit.models import create

    from .test_data import write_cifar

    dataset = recipe.split("/")[0]
    root = tmp_path / "data"
    if dataset == "cifar10":
        write_cifar(root, n=16)
        for f in (root / "cifar-10-batches-py").glob("data_batch_*"):
            f.unlink()  # no training file at all
    else:
        _write_svhn_test(root)
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    arch = load_config(ROOT / "configs" / ("cifar10/teacher_resnet34.yaml" if dataset == "cifar10" else
                                          "svhn/teacher_wrn_40_2.yaml")).model.arch
    info = DataInfo(dataset, [str(i) for i in range(10)], (3, 32, 32), [0.5] * 3, [0.25] * 3)
    teacher = tmp_path / "teacher.pt"
    save_model(teacher, create(arch, num_classes=10, in_channels=3), ModelConfig(arch=arch), {"num_classes": 10,
               "in_channels": 3}, info)
    small = {"output_dir": str(tmp_path / "run"), "data.root": str(root), "teacher.checkpoint": str(teacher),
             "train.batch_size": 4, "train.epochs": 1, "method.steps_per_epoch": 2, "train.progress": "none",
             "method.diagnostics_samples": 4, "method.grid_images": 4}
    small |= {"method.batches": 1, "method.iterations": 2} if cfg.method.name == "deepinversion" else {}
    small |= {"method.generator_epochs": 1} if cfg.method.name == "rdskd" else {}
    small |= {"method.student_steps": 1} if cfg.method.name == "dfad" else {}
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", [f"{k}={v}" for k, v in small.items()])
    s = execute(cfg, "distill").summary
    assert s["data"]["train"] == 0 and s["data"]["test"] == 16 and s["model"] == cfg.student.arch


def test_svhn_reader_maps_label_10_to_0_and_rejects_bad_files(tmp_path):
    from kdkit.config import DataConfig
    from kdkit.data import load_data
    from kdkit.errors import DataError

    root = tmp_path / "svhn"
    _write_svhn_test(root, n=12)
    b = load_data(DataConfig(name="svhn", root=str(root), val_split=0), train_images=False,
                  stats=([0.5] * 3, [0.25] * 3))
    assert b.train is None and b.test.images.shape == (12, 3, 32, 32)
    assert b.test.labels.tolist() == [(i % 10 + 1) % 10 for i in range(12)]  # digit 0 is stored as 10
    with pytest.raises(DataError, match=r"train_32x32\.mat not found"):
        load_data(DataConfig(name="svhn", root=str(root), val_split=0))
    (root / "test_32x32.mat").write_bytes((root / "test_32x32.mat").read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_data(DataConfig(name="svhn", root=str(root), val_split=0), train_images=False)


def test_snapshot_minutes_must_increase():
    from kdkit.errors import ConfigError

    with pytest.raises(ConfigError, match="snapshot_min: positive minutes in increasing order"):
        load_config(None, ["train.snapshot_min=[5,2]"])


# ------------------------------------------------------------------------------- FastDFKD
def _fast(meta: str = "fomaml", **kw: object):
    from kdkit.methods import method_class
    from kdkit.models import create

    torch.manual_seed(0)
    info = DataInfo("mnist", [str(i) for i in range(10)], (1, 16, 16), [0.5], [0.25])
    cls = method_class("fast_dfkd")
    opts = cls.Options(meta=meta, generator_width=4, latent_dim=8, hflip=False, warmup=0, **kw)
    return cls(opts, student=create("mlp", in_channels=1, input_size=16, hidden=[8]),
               teacher=create("vgg8_bn", in_channels=1, input_size=16, width=0.0625).eval(), info=info,
               train=TrainConfig(batch_size=6, epochs=3))


@pytest.mark.parametrize("meta", ["fomaml", "reptile", "none"])
def test_fast_dfkd_synthesis_trains_a_copy_and_steps_the_meta_generator(meta):
    """A synthesis optimises a copy of the meta generator and the latent codes; the meta generator moves only
    through its own step (not with meta=none), the student and teacher get no gradient, the memory grows by
    the batch, and the first-order MAML step is Adam on the summed gradients of the copy's steps."""
    m = _fast(meta)
    before = {k: v.clone() for k, v in m.generator.state_dict().items()}
    s_before = [p.clone() for p in m.student.parameters()]
    terms = m.synthesize()
    after = m.generator.state_dict()
    moved = any(not torch.equal(before[k], after[k]) for k in before if after[k].dtype.is_floating_point)
    assert moved == (meta != "none")
    assert all(torch.equal(before[k], after[k]) for k in before if "running" in k)  # the copy ran, not the meta
    assert all(p.grad is None for p in m.student.parameters()) and all(torch.equal(a, b) for a, b in
                                                                       zip(s_before, m.student.parameters()))
    assert all(p.grad is None for p in m.teacher.parameters()) and all(p.grad is None for p in m.generator.parameters())
    assert len(m.pool) == 6 and m.pool.images.shape == (18, 1, 16, 16) and {"synthesis_bn", "synthesis_ce",
                                                                             "synthesis_adv"} <= set(terms)
    m.synthesize()
    assert len(m.pool) == 12 and int(m.syntheses) == 2 and m.bn.mmt is not None  # the BN momentum started


def test_fast_dfkd_meta_step_is_adam_on_the_summed_fast_gradients():
    m = _fast("fomaml", synthesis_steps=1, adv_weight=0.0, bn_momentum=0.0)
    w0 = m.generator.l1.weight.detach().clone()
    m.synthesize()
    # one fast step, so the summed gradient is that step's; Adam's first step moves each weight by about lr
    # (lr_g x steps = 5e-3) against its gradient's sign
    step = (m.generator.l1.weight.detach() - w0).abs()
    assert step.max().item() == pytest.approx(5e-3, rel=1e-3) and (step > 0).float().mean() > 0.9


def test_fast_dfkd_needs_batchnorm_or_says_how_to_go_without(tmp_path, teacher_file):
    from kdkit.errors import KdkitError

    with pytest.raises(KdkitError, match=r"method.bn_weight=0"):
        _datafree(tmp_path / "r", teacher_file, "fast_dfkd")
    r = _datafree(tmp_path / "nobn", teacher_file, "fast_dfkd", **{"method.bn_weight": 0.0, "train.epochs": 1,
                                                                   "method.hflip": False, "method.warmup": 0})
    assert r.summary["syntheses"] == 1


def test_fast_dfkd_end_to_end(tmp_path, cnn_teacher_file):
    r = _datafree(tmp_path / "run", cnn_teacher_file, "fast_dfkd",
                  **{"train.epochs": 4, "method.warmup": 2, "method.hflip": False, "method.crop_padding": 2,
                     "method.generator_width": 8})
    s = r.summary
    assert s["data"]["train"] == 0 and s["syntheses"] == 6 and s["pool_images"] == 6 * 32  # 2 before the student
    assert s["test_accuracy"] > 0.15  # chance is 0.10: the student learned from synthesised images alone
    epochs = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    assert [e["pool_images"] for e in epochs] == [96, 128, 160, 192] and all("synthesis_adv" in e for e in epochs)
    assert s["synthetic_images"] == {"synthesised": 6 * 32, "distilled": 4 * 8 * 32}  # 8 student steps an epoch
    gen, meta = load_generator(r.run_dir / "generator.pt")
    assert gen.sample(4, batch_stats=True).shape == (4, 1, 16, 16) and meta["batch_stats"] is True


def test_fast_dfkd_resume_is_bit_identical(tmp_path, cnn_teacher_file, monkeypatch):
    """The meta generator, its Adam moments, the BatchNorm momentum statistics and the memory survive a crash."""
    extra = {"train.epochs": 3, "train.checkpoint_every": 3, "train.deterministic": True, "method.warmup": 1,
             "method.hflip": False, "method.generator_width": 8}
    full = _datafree(tmp_path / "full", cnn_teacher_file, "fast_dfkd", **extra)
    o = {"teacher.checkpoint": str(cnn_teacher_file), "student.arch": "mlp", "student.hidden": "[32]",
         "method.name": "fast_dfkd", "method.steps_per_epoch": 8, "data.val_split": 0, "train.select": "last",
         "train.batch_size": 32, "method.diagnostics_samples": 64, "method.grid_images": 16,
         "method.latent_dim": 16, **extra}
    cfg = load_config(None, digits_overrides(tmp_path / "cut", **o))
    crash_at(cfg, 14, monkeypatch)  # in the second epoch, after its synthesis
    resumed = execute(cfg, "distill", resume=True)
    a, b = full.method.state_dict(), resumed.method.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("teacher."))
    assert resumed.summary["test_accuracy"] == full.summary["test_accuracy"]


def test_the_replay_bank_checkpoints_only_its_filled_rows():
    """A memory sized for a whole schedule is mostly empty early on: its checkpoint carries the filled rows only
    (not a view of the whole storage), and loading gives back the ring buffer at full capacity."""
    import io

    from kdkit.methods.datafree import ReplayBank

    torch.manual_seed(0)
    bank = ReplayBank(1000)
    bank.add(torch.randn(30, 1, 4, 4), torch.randn(30, 10))
    state = bank.state_dict()
    assert state["images"].shape == (30, 1, 4, 4) and state["logits"].shape == (30, 10)
    buf = io.BytesIO()
    torch.save(state, buf)
    assert len(buf.getvalue()) < 4 * 30 * (16 + 10) + 4000  # the 1,000-row storage would be 104,000 bytes
    back = ReplayBank(1000)
    back.load_state_dict(state)
    assert back.images.shape == (1000, 1, 4, 4) and back.logits.shape == (1000, 10) and len(back) == 30
    assert torch.equal(back.images, bank.images) and torch.equal(back.logits, bank.logits)
    more = torch.randn(5, 1, 4, 4), torch.randn(5, 10)
    bank.add(*more)
    back.add(*more)
    assert torch.equal(back.newest(35), bank.newest(35))
    full = ReplayBank(20)  # a wrapped ring keeps every row
    full.add(torch.randn(30, 1, 4, 4), torch.randn(30, 10))
    assert full.state_dict()["images"].shape == (20, 1, 4, 4)
