"""Adaptive multi-path distillation: path losses by hand, the weighting rules' defining properties, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.config import load_config
from kdkit.errors import ConfigError, ModelError
from kdkit.losses import GramLoss, NSTLoss, SoftmaxRegressionLoss, logit_regression
from kdkit.losses.regression import feature_map_loss
from kdkit.report import report
from kdkit.weighting import (
    DWAWeighting,
    EqualWeighting,
    FixedWeighting,
    GradNormWeighting,
    UncertaintyWeighting,
    dwa_weights,
)

from .conftest import ROOT, crash_at, digits_overrides, distill_run

ALL = "[soft_target, logits, hint, attention, gram, feature_map, softmax_regression]"
STUDENT = {"student.arch": "vgg8_bn", "student.width": 0.0625}


# ---------------------------------------------------------------------------------------- path losses


def test_gram_path_matches_hand_computation():
    fs = torch.tensor([[[[3.0, 4.0]], [[1.0, 0.0]]]])  # normalised channels: [.6, .8], [1, 0]
    ft = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])  # [0, 1], [1/sqrt2, 1/sqrt2]
    gs = [[1.0, 0.6], [0.6, 1.0]]
    r = 1 / math.sqrt(2)
    gt = [[1.0, r], [r, 1.0]]
    expected = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(2) for j in range(2)) / 4
    assert GramLoss()(fs, ft).item() == pytest.approx(expected, rel=1e-6)
    # spatial sizes may differ: each Gram matrix is over its own map
    assert GramLoss()(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)).item() >= 0
    with pytest.raises(ModelError, match="equal channel counts"):
        GramLoss()(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))


def test_nst_mmd_matches_hand_computation():
    """The NST paper's MMD^2 with the polynomial kernel (a.b)^2 over the normalised channel maps."""
    fs = torch.tensor([[[[3.0, 4.0]], [[1.0, 0.0]]]])  # s = [.6, .8], [1, 0]
    ft = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])  # t = [0, 1], [r, r] with r = 1/sqrt2
    # k(t,t) = [[1, .5], [.5, 1]]: mean .75; k(s,s) = [[1, .36], [.36, 1]]: mean .68;
    # k(s,t) = [[.64, (1.4 r)^2 = .98], [0, .5]]: mean .53;  MMD^2 = .75 + .68 - 2 * .53 = .37
    assert NSTLoss()(fs, ft).item() == pytest.approx(0.37, rel=1e-5)
    assert NSTLoss()(ft, ft).item() == pytest.approx(0.0, abs=1e-6)
    # the channel counts may differ (no adapter needed); spatial sizes may not, unless resized
    assert NSTLoss()(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)).item() >= 0
    with pytest.raises(ModelError, match="equal size.*method.resize=true"):
        NSTLoss()(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    assert NSTLoss(resize=True)(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)).item() >= 0


def test_nst_path_name_is_refused_with_both_meanings():
    with pytest.raises(ConfigError, match="'gram' is the Gram-matrix MSE.*'nst_mmd' is the NST paper"):
        load_config(None, ["method.name=adaptive", "method.paths=[nst, logits]"])


def test_regression_paths_match_hand_computation():
    assert logit_regression(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])).item() == pytest.approx(2.5)
    fs = torch.tensor([[[[1.0], [3.0]], [[0.0], [4.0]]]])  # channel means 2, 2
    ft = torch.tensor([[[[1.0]], [[5.0]]]])  # channel means 1, 5 (another spatial size)
    assert feature_map_loss(fs, ft).item() == pytest.approx(((2 - 1) ** 2 + (2 - 5) ** 2) / 2)
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        head.bias.copy_(torch.tensor([0.0, 1.0]))
    head.requires_grad_(False)
    sr = SoftmaxRegressionLoss(head)
    e = torch.tensor([[1.0, 1.0]], requires_grad=True)  # head(e) = [1, 3]
    loss = sr(e, torch.tensor([[0.0, 3.0]]))
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert e.grad is not None and head.weight.grad is None  # gradient reaches the student, not the frozen head
    assert not list(sr.parameters())  # the teacher's head is not a parameter of the loss


# ---------------------------------------------------------------------------------------- weightings


def test_uncertainty_objective_and_its_gradient_in_closed_form():
    w = UncertaintyWeighting(["a", "b"], {"a": 1.0, "b": 3.0})
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.3, -0.2]))
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    total = w(losses)
    assert total.item() == pytest.approx(math.exp(-0.3) * 2.0 + math.exp(0.2) * 1.5 + 0.1, rel=1e-6)
    total.backward()
    # d/ds_i [exp(-s_i) w_i L_i + s_i] = 1 - exp(-s_i) w_i L_i
    assert w.log_var.grad.tolist() == pytest.approx([1 - math.exp(-0.3) * 2.0, 1 - math.exp(0.2) * 1.5], rel=1e-6)
    assert w.effective_weights() == pytest.approx({"a": math.exp(-0.3), "b": 3 * math.exp(0.2)}, rel=1e-6)
    assert w.param_groups()[0]["weight_decay"] == 0.0


def test_equal_ignores_priors_fixed_uses_them():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    assert EqualWeighting(["a", "b"], {"b": 10.0})(losses).item() == pytest.approx(2.5)
    assert FixedWeighting(["a", "b"], {"b": 10.0})(losses).item() == pytest.approx(7.0)
    with pytest.raises(ConfigError, match="unknown losses"):
        FixedWeighting(["a"], {"c": 1.0})
    with pytest.raises(ValueError, match="missing"):
        FixedWeighting(["a", "b"])({"a": torch.tensor(1.0)})


def test_gradnorm_balances_gradient_norms_on_a_toy_two_loss_problem():
    torch.manual_seed(0)
    shared = nn.Linear(4, 16)
    heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])
    x = torch.randn(128, 4)
    ys = [x @ torch.randn(4, 1), x @ torch.randn(4, 1)]
    gn = GradNormWeighting(["big", "small"], shared=lambda: list(shared.parameters()), alpha=1.5, lr=0.025)
    opt = torch.optim.SGD([*shared.parameters(), *heads.parameters()], lr=1e-4)

    def losses():
        h = torch.relu(shared(x))
        return {"big": 100 * F.mse_loss(heads[0](h), ys[0]), "small": F.mse_loss(heads[1](h), ys[1])}

    first = gn.gradient_norms(gn.prior * gn.stack(losses()))
    imbalance0 = abs(math.log(first[0].item() / first[1].item()))
    assert imbalance0 > 3  # the 100x loss has a far larger gradient
    for _ in range(300):
        opt.zero_grad()
        gn(losses()).backward()
        opt.step()
    g = gn.g.tolist()
    norms = gn.gradient_norms(gn.prior * gn.stack(losses()))
    weighted = [g[0] * norms[0].item(), g[1] * norms[1].item()]
    assert sum(g) == pytest.approx(2.0, rel=1e-5)
    assert g[1] / g[0] > 10  # the small loss gained weight
    assert abs(math.log(weighted[0] / weighted[1])) < imbalance0 / 3  # weighted gradient norms much closer


def test_gradnorm_every_k_updates_only_on_every_kth_step_and_survives_a_state_dict_round_trip():
    shared = nn.Linear(3, 3)
    x = torch.randn(8, 3)

    def losses():
        h = shared(x)
        return {"a": 10 * h.pow(2).mean(), "b": h.abs().mean()}

    def make(every):
        return GradNormWeighting(["a", "b"], shared=lambda: list(shared.parameters()), lr=0.5, every=every)

    one, three = make(1), make(3)
    history = []
    for _ in range(7):
        three(losses())
        history.append(three.g.clone())
    changed = [i for i in range(7) if not torch.equal(history[i], history[i - 1] if i else torch.ones(2))]
    assert changed == [0, 3, 6]
    one(losses())  # the same losses: the first update of every=3 is the every=1 rule's update
    assert torch.allclose(history[0], one.g)
    again = make(3)
    again.load_state_dict(three.state_dict())  # the step count is saved: a resumed run updates on the same steps
    assert int(again.calls) == 7 and "calls" not in one.state_dict()
    with pytest.raises(ConfigError, match="at least 1"):
        make(0)


def test_gradnorm_epoch_stats_are_the_epoch_means_of_its_gradient_norms_and_rates_then_reset():
    """By hand: W = w, L_a = 3 w^2 (G_a = 6w), prior-scaled L_b = 2 w (G_b = 2). At w = 2 the losses start the
    rates (r = 1, 1); at w = 1 the ratios are 3/12 and 2/4, so r = (0.25, 0.5) / 0.375 = (2/3, 4/3)."""
    w = nn.Parameter(torch.tensor(2.0))
    gn = GradNormWeighting(["a", "b"], {"b": 2.0}, shared=lambda: [w])
    assert gn.epoch_stats() == {}  # no update yet
    for value in (2.0, 1.0):
        with torch.no_grad():
            w.fill_(value)
        gn({"a": 3 * w ** 2, "b": w})
    stats = gn.epoch_stats()
    assert stats == pytest.approx({"gradnorm/grad/a": (12 + 6) / 2, "gradnorm/grad/b": 2.0,
                                   "gradnorm/r/a": (1 + 2 / 3) / 2, "gradnorm/r/b": (1 + 4 / 3) / 2}, rel=1e-6)
    assert gn.epoch_stats() == {}  # reset for the next epoch
    assert "norm_sums" not in gn.state_dict()  # checkpoints keep their keys


def test_gradnorm_adam_rule_takes_adam_steps_on_the_weights_by_hand():
    """G = (2, 1), equal rates: the target is mean(g G) for both, so sign = (+1, -1) and the gradient on g is
    sign * G = (2, -1). Adam's bias-corrected step is lr * m_hat / sqrt(v_hat) = lr * sign while the gradient
    does not change: g = (1 - 0.1, 1 + 0.1), then (0.8, 1.2) (the sum is already 2)."""
    gn = GradNormWeighting(["a", "b"], shared=list, lr=0.1, rule="adam")
    norms, losses = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    gn.update(losses, norms)
    assert gn.g.tolist() == pytest.approx([0.9, 1.1], abs=1e-6)
    gn.update(losses, norms)
    assert gn.g.tolist() == pytest.approx([0.8, 1.2], abs=1e-6)
    assert {"adam_m", "adam_v", "adam_step"} <= set(gn.state_dict()) and int(gn.adam_step) == 2
    assert "adam_m" not in GradNormWeighting(["a", "b"], shared=list).state_dict()  # checkpoints keep their keys
    with pytest.raises(ConfigError, match="update rule must be one of"):
        GradNormWeighting(["a", "b"], shared=list, rule="sgd")


def test_gradnorm_relative_rule_cannot_raise_a_tiny_weight_that_the_adam_rule_raises():
    """Equal gradient norms; loss a learns slowest (r_a^1.5 > 4: its target cannot be met), so a takes nearly all
    the weight. Then b becomes the slowest: c and d are below their targets all along (they should rise), but under
    kdkit's relative rule their share of mean(g G) is tiny, so the renormalisation outpaces their own step and they
    keep falling; under Adam they hold near their targets."""
    norms = torch.ones(4)
    finals = {}
    for rule in ("relative", "adam"):
        gn = GradNormWeighting(list("abcd"), shared=list, rule=rule)
        gn.update(torch.ones(4), norms)  # L(0) = 1
        for t in range(4000):
            gn.update(torch.tensor([0.9, 0.2, 0.2, 0.2] if t < 2000 else [0.2, 0.9, 0.2, 0.2]), norms)
        finals[rule] = gn.g.tolist()
    assert finals["relative"][1] > 3.5 and finals["adam"][1] > 2.5  # b, now the slowest, leads under both
    assert max(finals["relative"][2:]) < 1e-3  # c and d fell, though below their targets
    assert min(finals["adam"][2:]) > 0.2


def test_normalized_divides_each_loss_by_its_running_mean():
    """L = sum_i w_i L_i / sg(mean_i): the first value starts the mean (the term is then w_i), later values move it
    by 1% per step; the gradient is the loss's divided by its mean, whatever the loss's constant factors."""
    from kdkit.weighting import NormalizedWeighting

    w = NormalizedWeighting(["a", "b"], {"a": 1.0, "b": 0.5})
    x = torch.tensor(2.0, requires_grad=True)
    out = w({"a": 10 * x, "b": torch.tensor(4.0)})
    assert out.item() == pytest.approx(1.0 + 0.5)
    out.backward()
    assert x.grad.item() == pytest.approx(10 / 20)  # d(10x / 20) / dx
    out = w({"a": torch.tensor(40.0), "b": torch.tensor(4.0)})
    mean_a = 0.99 * 20 + 0.01 * 40
    assert out.item() == pytest.approx(40 / mean_a + 0.5)
    assert w.effective_weights()["a"] == pytest.approx(1 / mean_a)
    # the scale of a loss does not change the gradient it gives
    grads = []
    for scale in (1.0, 16.0):
        n = NormalizedWeighting(["kd"])
        y = torch.tensor(3.0, requires_grad=True)
        n({"kd": scale * y ** 2}).backward()
        grads.append(y.grad.item())
    assert grads[0] == pytest.approx(grads[1])


def test_dwa_reproduces_its_formula():
    w = DWAWeighting(["a", "b"], temperature=2.0)
    w.train()
    for epoch_losses in ([1.0, 2.0], [0.5, 2.0]):
        for _ in range(3):
            w({"a": torch.tensor(epoch_losses[0]), "b": torch.tensor(epoch_losses[1])})
        assert w.lam.tolist() == [1.0, 1.0]  # the first two epochs are unweighted
        w.end_epoch()
    # lambda_k = K exp(r_k / T) / sum_i exp(r_i / T), r = L(t-1) / L(t-2) = [0.5, 1.0]
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert w.lam.tolist() == pytest.approx([2 * ea / (ea + eb), 2 * eb / (ea + eb)], rel=1e-6)
    assert dwa_weights(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), 2.0).tolist() == [1.0, 1.0]
    w.eval()
    w({"a": torch.tensor(9.0), "b": torch.tensor(9.0)})
    assert w.count.item() == 0  # evaluation passes do not count


# ---------------------------------------------------------------------------------------- the method


@pytest.mark.parametrize("weighting", ["equal", "fixed", "uncertainty", "gradnorm", "gradnorm-adam", "dwa",
                                       "normalized"])
def test_all_paths_train_with_every_weighting(tmp_path, cnn_teacher_file, weighting):
    rule = {"method.gradnorm_rule": "adam"} if weighting == "gradnorm-adam" else {}
    weighting = weighting.split("-")[0]
    res = distill_run(tmp_path / "r", cnn_teacher_file, **{
        "method.name": "adaptive", "method.paths": ALL, "method.weighting": weighting, "train.epochs": 3, **rule,
        **STUDENT})
    s = res.summary
    assert s["paths"] == ["soft_target", "logits", "hint", "attention", "gram", "feature_map", "softmax_regression"]
    assert s["test_accuracy"] > 0.3 and set(s["final_weights"]) == {f"weight/{p}" for p in s["paths"]}
    epochs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "epoch"]
    assert len(epochs) == 3 and all(f"weight/{p}" in e and f"train/path/{p}" in e for e in epochs for p in s["paths"])
    w = [e["weight/soft_target"] for e in epochs]
    if weighting in ("equal", "fixed"):
        assert w == [1.0, 1.0, 1.0]
    elif weighting == "dwa":
        assert w[:2] == [1.0, 1.0]
    else:
        assert w[0] != 1.0
    logged = {k for k in epochs[-1] if k.startswith("gradnorm/")}
    if weighting == "gradnorm":  # each epoch logs the norms and rates its weights came from
        assert all(e[f"gradnorm/grad/{p}"] > 0 for e in epochs for p in s["paths"])
        assert logged == {f"gradnorm/{q}/{p}" for q in ("grad", "r") for p in s["paths"]}
    else:
        assert not logged
    assert s["params"] == sum(p.numel() for p in res.model.parameters())  # adapters not in the exported student


def test_fixed_weights_layer_wise_paths_and_report(tmp_path, cnn_teacher_file):
    paths = "[{name: soft_target, weight: 0.5}, {name: hint, pairs: [[stage2, stage2], [stage3, stage3]]}]"
    res = distill_run(tmp_path / "r", cnn_teacher_file, **{
        "method.name": "adaptive", "method.weighting": "fixed", "method.layer_wise": True, "method.paths": paths,
        "train.epochs": 2, **STUDENT})
    assert res.summary["final_weights"] == {"weight/soft_target": 0.5, "weight/hint:stage2": 1.0,
                                            "weight/hint:stage3": 1.0}
    files = report([res.run_dir])
    assert {f.name for f in files} == {"curves.png", "weights.png", "report.md"}
    assert all(f.stat().st_size > 1000 for f in files if f.suffix == ".png")
    assert "soft_target" in (res.run_dir / "report.md").read_text()


def test_uncertainty_log_variances_are_trained_with_the_student(tmp_path, cnn_teacher_file):
    res = distill_run(tmp_path / "r", cnn_teacher_file, **{"method.name": "adaptive", "train.epochs": 2, **STUDENT})
    state = torch.load(res.run_dir / "checkpoint.pt", weights_only=True)["method"]
    s = state["weighting.log_var"]
    assert s.shape == (4,) and (s != 0).all()


def test_uncertainty_weights_train_with_the_authors_optimizer(tmp_path, cnn_teacher_file):
    """The s_i get SGD at 0.1 (momentum 0.9) whatever the student's optimizer: under the student's Adam at 1e-3
    they could move by at most about 1e-3 per step, which is equal weighting in all but name."""
    extra = {"method.name": "adaptive", "train.epochs": 2, "train.lr": 0.001, **STUDENT}
    moved = {}
    for name, wo in (("authors", None), ("student's adam", "{}")):
        res = distill_run(tmp_path / name.replace(" ", "_"), cnn_teacher_file,
                          **extra, **({"method.weights_optimizer": wo} if wo else {}))
        steps = res.summary["stages"][0]["steps"]
        s = torch.load(res.run_dir / "checkpoint.pt", weights_only=True)["method"]["weighting.log_var"]
        moved[name] = float(s.abs().max())
    assert moved["student's adam"] <= steps * 0.001 * 1.1  # Adam's steps are about lr each
    assert moved["authors"] > 10 * moved["student's adam"]


def test_paths_with_bad_layers_fail_before_training(tmp_path, cnn_teacher_file):
    with pytest.raises(ModelError, match=r"no module 'stage9'; closest: .*stage"):
        distill_run(tmp_path / "a", cnn_teacher_file, **{
            "method.name": "adaptive", "method.paths": "[{name: hint, pairs: [[stage9, stage2]]}]", **STUDENT})
    assert not (tmp_path / "a").exists()
    with pytest.raises(ModelError, match=r"spatial size of student layer 'stage2' \(2, 8, 4, 4\) differs from "
                                         r"teacher layer 'stage1' \(2, 8, 8, 8\)"):
        distill_run(tmp_path / "b", cnn_teacher_file, **{
            "method.name": "adaptive", "method.paths": "[{name: attention, pairs: [[stage2, stage1]]}]", **STUDENT})
    res = distill_run(tmp_path / "c", cnn_teacher_file, **{
        "method.name": "adaptive", "method.resize": True, "train.epochs": 1,
        "method.paths": "[{name: hint, pairs: [[stage2, stage1]]}, {name: attention, pairs: [[stage2, stage1]]}]",
        **STUDENT})
    assert res.summary["paths"] == ["hint", "attention"]


@pytest.mark.parametrize("override,message", [
    ("method.paths=[hnit]", r"'hnit' is not one of .* \(did you mean 'hint'"),
    ("method.paths=[hint, hint]", "appear\\(s\\) twice; give each a distinct 'label'"),
    ("method.paths=[{name: logits, pairs: [[a, b]]}]", "'logits' compares outputs, not layers"),
    ("method.paths=[ce]", "CE is both a path and ce_weight"),
    ("method.weighting=uncertainy", "did you mean 'uncertainty'"),
    ("method.weights_optimizer={optimizer: sdg}", r"weights_optimizer: train.optimizer: 'sdg' is not one of"),
])
def test_adaptive_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*digits_overrides(tmp_path, **{"method.name": "adaptive"}), override])


def test_dwa_state_survives_a_crash_and_resume(tmp_path, cnn_teacher_file, monkeypatch):
    from kdkit.run import execute

    extra = {"method.name": "adaptive", "method.weighting": "dwa", "train.epochs": 4, "train.checkpoint_every": 3,
             "train.deterministic": True, "teacher.checkpoint": str(cnn_teacher_file), **STUDENT}
    ref = execute(load_config(None, digits_overrides(tmp_path / "ref", **extra)), "distill")
    cfg = load_config(None, digits_overrides(tmp_path / "run", **extra))
    crash_at(cfg, 50, monkeypatch)  # inside epoch 3, after DWA's first update
    res = execute(cfg, "distill", resume=True)
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res.summary["final_weights"] == ref.summary["final_weights"]


def test_report_on_a_run_in_progress(tmp_path, capsys):
    from kdkit.cli import main

    lines = [{"event": "epoch", "stage": "distill", "epoch": i, "train/loss": 1.0 / i, "val/accuracy": 0.5 + 0.1 * i,
              "weight/a": 1.0 + i, "weight/b": 1.0 / i} for i in (1, 2, 3)]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"event": "ep'  # the line being written is partial
    (tmp_path / "metrics.jsonl").write_text(text)
    assert main(["report", str(tmp_path)]) == 0
    assert "In progress: 3 epoch(s) logged." in (tmp_path / "report.md").read_text()
    assert (tmp_path / "weights.png").stat().st_size > 1000 and (tmp_path / "curves.png").exists()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_recipes_are_the_authors_configurations():
    """Their 'all' aggregates four paths (NST, i.e. the Gram path, logits, attention, soft target) with the
    uncertainty rule; their equal baseline is attention + soft target; their hand-tuned one AT x 1000, ST x 0.1."""
    def paths(recipe):
        o = load_config(ROOT / f"configs/mnist/{recipe}.yaml").method.options
        return o.weighting, [(p.name, p.weight) for p in o.specs]

    assert paths("adaptive") == ("uncertainty", [("gram", 1.0), ("logits", 1.0), ("attention", 1.0),
                                                 ("soft_target", 1.0)])
    assert paths("adaptive_equal") == ("equal", [("attention", 1.0), ("soft_target", 1.0)])
    assert paths("adaptive_fixed") == ("fixed", [("attention", 1000.0), ("soft_target", 0.1)])
    o = load_config(ROOT / "configs/mnist/adaptive.yaml").method.options
    assert o.weights_optimizer == {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                                   "weight_decay": 1e-4}
