from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit.errors import ModelError
from kdkit.models import create
from kdkit.taps import Taps, resolve


class UserNet(nn.Module):
    """A model that knows nothing about kdkit."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_taps_read_outputs_and_inputs_by_path():
    net = UserNet()
    x = torch.randn(2, 1, 5, 5)
    with Taps(net, ["body.0", "body", "head:input"]) as taps:
        out = net(x)
        conv0 = net.body[0](x)
        assert torch.equal(taps["body.0"], conv0)
        assert taps["body"].shape == (2, 6, 5, 5)
        assert torch.equal(taps["head:input"], taps["body"].mean((2, 3)))
        assert torch.equal(net.head(taps["head:input"]), out)
    assert not net.body[0]._forward_hooks and not net.head._forward_pre_hooks


def test_taps_remove_leaves_no_hooks():
    net = create("resnet8", num_classes=10)
    taps = Taps(net, ["layer1", "layer2.0.conv1", "fc:input"])
    taps.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_unknown_path_lists_closest():
    net = create("resnet8", num_classes=10)
    with pytest.raises(ModelError, match=r"no module 'layer2\.0\.conv3'.*closest: .*layer2\.0\.conv1"):
        Taps(net, ["layer2.0.conv3"])
    with pytest.raises(ModelError, match="only suffix"):
        resolve(net, "fc:output")


def test_untouched_tap_is_a_clear_error():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    m = Skip()
    with Taps(m, ["unused"]) as t:
        m(torch.randn(1, 2))
        with pytest.raises(ModelError, match="saw no forward pass"):
            t["unused"]


def test_taps_see_through_ddp_like_wrappers():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, x):
            return self.module(x)

    net = UserNet()
    w = Wrapper(net)
    with Taps(w, ["body"]) as t:
        w(torch.randn(1, 1, 4, 4))
        assert t["body"].shape == (1, 6, 4, 4)
