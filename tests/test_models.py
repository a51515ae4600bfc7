from __future__ import annotations

import pytest
import torch

from kdkit.errors import ConfigError, ModelError
from kdkit.measure import count_params
from kdkit.models import build, create, entry, model_parts, zoo_names
from kdkit.taps import Taps

# parameter counts of the standard CIFAR zoo (RepDistiller / the original papers), 100 classes
REFERENCE_PARAMS_100 = {"resnet8x4": 1.23e6, "resnet32x4": 7.43e6, "wrn_40_2": 2.26e6, "wrn_16_2": 0.70e6,
                        "resnet56": 0.86e6, "resnet110": 1.74e6, "vgg13": 9.46e6, "vgg8": 3.96e6}


@pytest.mark.parametrize("name", zoo_names())
def test_every_zoo_model_builds_runs_and_declares_its_parts(name):
    size = entry(name).default_input_size
    task = entry(name).task
    dense = task in ("segmentation", "detection")
    for c, k in ((1, 10), (3, 7)):
        m = create(name, num_classes=k, in_channels=c)
        y = m(torch.randn(2, c, size, size))
        if task == "detection":  # heatmaps, sizes and offsets on a grid at an integer stride
            assert y.shape[:2] == (2, k + 4) and size % y.shape[-1] == 0
        else:
            assert y.shape == ((2, k, size, size) if dense else (2, k))
    if task == "embedding":  # the output is the embedding; no classifier inside
        parts = model_parts(m, classifier="stem")
        with Taps(m, list(parts.stages)) as t:
            m.eval()(torch.randn(2, 3, size, size))
            assert all(t[s].dim() == 4 for s in parts.stages)
        return
    parts = model_parts(m)
    assert parts.stages, name
    if dense:  # stages are feature maps; the classifier is a conv
        with Taps(m, list(parts.stages)) as t:
            m(torch.randn(2, 3, size, size))
            assert all(t[s].dim() == 4 for s in parts.stages)
        return
    with Taps(m, [*parts.stages, parts.embedding]) as t:
        m(torch.randn(2, 3, size, size))
        emb = t[parts.embedding]
        assert emb.dim() == 2 and emb.shape[1] == dict(m.named_modules())[parts.classifier].in_features


@pytest.mark.parametrize("name,expected", sorted(REFERENCE_PARAMS_100.items()))
def test_parameter_counts_match_the_literature(name, expected):
    assert count_params(create(name, num_classes=100)) == pytest.approx(expected, rel=0.02)


def test_lenet_pair_matches_the_data_free_papers():
    assert count_params(create("lenet5", in_channels=1)) == 61706  # "62K" in DAFL
    assert count_params(create("lenet5_half", in_channels=1)) == 15738  # "16K"
    # MNIST's 28x28 works too (zero padding), 8x8 asks for a resize
    assert create("lenet5", in_channels=1, input_size=28)(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ModelError, match="image_size"):
        create("lenet5", in_channels=1, input_size=8)


def test_width_multiplier_halves_channels():
    full, half = create("resnet20"), create("resnet20", width=0.5)
    assert full.layer3[0].conv1.out_channels == 64 and half.layer3[0].conv1.out_channels == 32
    assert count_params(half) < count_params(full) / 3
    assert create("vgg16", width=0.5).stage5[0].out_channels == 256


def test_wrn_any_depth_width_and_bad_names():
    m = create("wrn_22_3")
    assert m.layer3[0].conv1.out_channels == 192
    with pytest.raises(ModelError, match="6n\\+4"):
        create("wrn_21_2")
    with pytest.raises(ConfigError, match="did you mean 'resnet20'"):
        create("resnet200")
    with pytest.raises(ModelError, match="6n\\+4"):
        build(arch="wrn", depth=21, widen=1)


def test_user_model_parts_are_found_or_given():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 8)
            self.b = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(x).relu())

    parts = model_parts(Net())
    assert parts.classifier == "b" and parts.embedding == "b:input" and parts.stages == ()
    assert model_parts(Net(), stages=["a"], classifier="b").stages == ("a",)
    with pytest.raises(ModelError, match="no module 'aa.x'.*top-level modules are: a, b"):
        model_parts(Net(), stages=["aa.x"])
