"""Loss modules against values computed by hand (python `math`, not torch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdkit.errors import ModelError
from kdkit.losses import Adapter, AttentionLoss, HintLoss, KDLoss, attention_map, kd_loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    # T^2 * mean over the batch of sum_k p_t (log p_t - log p_s), computed with math.exp/log in the notebook:
    # row 1: 2.0738163287413798, row 2: 0.5564258313302529
    assert kd_loss(s, t, 2.0).item() == pytest.approx(1.3151210800358164, rel=1e-6)
    assert KDLoss(2.0)(s, t).item() == pytest.approx(1.3151210800358164, rel=1e-6)


def test_kd_loss_direction_is_teacher_to_student():
    # KL(p_s || p_t) (swapped arguments, a known bug elsewhere) gives 2.0443756787323717 on row 1
    s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 1.0, 0.0]])
    assert kd_loss(s, t, 2.0).item() == pytest.approx(2.0738163287413798, rel=1e-6)
    assert kd_loss(s, t, 2.0).item() != pytest.approx(2.0443756787323717, rel=1e-3)


def test_kd_loss_hand_formula_random():
    torch.manual_seed(0)
    s, t, T = torch.randn(4, 5), torch.randn(4, 5), 3.0
    total = 0.0
    for i in range(4):
        es = [math.exp(v / T) for v in s[i].tolist()]
        et = [math.exp(v / T) for v in t[i].tolist()]
        ps, pt = [v / sum(es) for v in es], [v / sum(et) for v in et]
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * total / 4, rel=1e-5)


def test_kd_loss_zero_when_equal_and_no_teacher_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    t = s.detach().clone().requires_grad_(True)
    loss = kd_loss(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert t.grad is None


def test_kd_loss_rejects_class_count_mismatch():
    with pytest.raises(ValueError, match="same number of classes"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 100))


def test_hint_loss_identity_is_mse():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.5, 2.0], [1.0, 4.0]])
    # ((-0.5)^2 + 0 + 2^2 + 0) / 4 = 1.0625
    assert HintLoss()(a, b).item() == pytest.approx(1.0625)


def test_hint_loss_through_a_known_conv_adapter():
    adapter = Adapter(torch.Size([1, 1, 1, 2]), torch.Size([1, 2, 1, 2]), kind="conv")
    with torch.no_grad():
        adapter.map.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        adapter.map.bias.copy_(torch.tensor([0.0, 1.0]))
    fs = torch.tensor([[[[1.0, 3.0]]]])  # adapted: ch0 = [2, 6], ch1 = [0, -2]
    ft = torch.tensor([[[[2.0, 5.0]], [[1.0, -2.0]]]])
    # squared errors: 0, 1, 1, 0 -> mean 0.5
    assert HintLoss(adapter)(fs, ft).item() == pytest.approx(0.5)


def test_adapter_shapes_and_errors():
    assert isinstance(Adapter(torch.Size([2, 8, 4, 4]), torch.Size([2, 8, 4, 4])).map, nn.Identity)
    a = Adapter(torch.Size([2, 8, 4, 4]), torch.Size([2, 16, 4, 4]))
    assert a(torch.randn(2, 8, 4, 4)).shape == (2, 16, 4, 4)
    lin = Adapter(torch.Size([2, 8]), torch.Size([2, 5]))
    assert lin(torch.randn(2, 8)).shape == (2, 5)
    with pytest.raises(ModelError, match="spatial size.*'s.l'.*'t.l'"):
        Adapter(torch.Size([2, 8, 4, 4]), torch.Size([2, 8, 8, 8]), names=("s.l", "t.l"))
    r = Adapter(torch.Size([2, 8, 4, 4]), torch.Size([2, 8, 8, 8]), spatial="resize")
    assert r(torch.randn(2, 8, 4, 4)).shape == (2, 8, 8, 8)
    with pytest.raises(ModelError, match="maps or"):
        Adapter(torch.Size([2, 8]), torch.Size([2, 8, 4, 4]))


def test_attention_loss_matches_hand_computation():
    fs = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # channel sums of squares: [10, 4]
    ft = torch.tensor([[[[2.0, 1.0]]]])  # [4, 1]
    expected = ((10 / math.sqrt(116) - 4 / math.sqrt(17)) ** 2 + (4 / math.sqrt(116) - 1 / math.sqrt(17)) ** 2) / 2
    assert expected == pytest.approx(0.009169831955701037)
    assert AttentionLoss()(fs, ft).item() == pytest.approx(expected, rel=1e-6)
    am = attention_map(fs)
    assert am.norm(dim=1).item() == pytest.approx(1.0)


def test_attention_loss_spatial_mismatch():
    with pytest.raises(ModelError, match="differ in size"):
        AttentionLoss()(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8))
    assert AttentionLoss(resize=True)(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8)).item() >= 0


@pytest.mark.parametrize("cin", [3, 32])
def test_pointwise_is_a_1x1_convolution(cin):
    from kdkit.losses.adapters import Pointwise

    torch.manual_seed(0)
    p = Pointwise(cin, 5)
    conv = nn.Conv2d(cin, 5, 1)
    conv.load_state_dict(p.state_dict())
    x = torch.randn(4, cin, 6, 7, requires_grad=True)
    y1, y2 = p(x), conv(x)
    assert isinstance(p, nn.Conv2d) and torch.allclose(y1, y2, atol=1e-5)
    g1 = torch.autograd.grad(y1.square().sum(), [x, p.weight])
    g2 = torch.autograd.grad(y2.square().sum(), [x, conv.weight])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g1, g2))


def test_kd_scale_and_logit_standardization_by_hand():
    from kdkit.losses.kd import kd_loss, standardized

    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[10.0, 0.0, 20.0]])
    T = 4.0
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    kl = float((pt * (pt.log() - ps.log())).sum())
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * kl, rel=1e-5)
    assert kd_loss(s, t, T, scale="t").item() == pytest.approx(T * kl, rel=1e-5)
    # standardised: [1, 2, 3] -> [-1, 0, 1] (mean 2, sd 1); [10, 0, 20] -> [0, -1, 1] (mean 10, sd 10)
    assert torch.allclose(standardized(s), torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(standardized(t), torch.tensor([[0.0, -1.0, 1.0]]), atol=1e-6)
    ps = torch.softmax(torch.tensor([[-1.0, 0.0, 1.0]]) / T, 1)
    pt = torch.softmax(torch.tensor([[0.0, -1.0, 1.0]]) / T, 1)
    kl = float((pt * (pt.log() - ps.log())).sum())
    assert kd_loss(s, t, T, standardize=True).item() == pytest.approx(T * T * kl, rel=1e-4)
    # scale-free: multiplying the teacher's logits changes nothing once standardised
    assert kd_loss(s, 7 * t, T, standardize=True).item() == pytest.approx(kd_loss(s, t, T, standardize=True).item())
