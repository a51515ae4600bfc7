"""The Python API (kdkit.distill, kdkit.train) on the user's own modules and data, and the examples/ scripts."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdkit
from kdkit.errors import ConfigError, DataError, ModelError

from .conftest import ROOT


class Net(nn.Module):
    """A user's model, defined inside the test module (not importable by a factory path)."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _data(n: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3 + y.view(-1, 1, 1, 1) / 10.0  # separable by brightness
    return x, y


QUICK = {"train": {"epochs": 4, "batch_size": 32, "optimizer": "adam", "lr": 0.01, "progress": "none"}}


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    torch.manual_seed(0)  # the user's module is built before kdkit seeds anything: fix its initialisation here
    res = kdkit.train(Net(16), loader, test_data=_data(100, seed=1), output_dir=str(out / "teacher"),
                      train={**QUICK["train"], "epochs": 12})
    return res, loader, out


def test_train_and_distill_user_modules_with_a_dataloader(taught):
    teacher, loader, out = taught
    assert teacher.summary["command"] == "train" and teacher.summary["data"]["train"] > 0
    assert teacher.summary["data"]["test"] == 100 and teacher.test_accuracy > 0.25  # chance: 0.10
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    student = Net(4)
    res = kdkit.distill(teacher.model, student, loader, method="fitnets", test_data=_data(100, seed=1),
                        pairs=[["body.0", "body.0"]], kd_weight=1.0, output_dir=str(out / "student"), **QUICK)
    assert res.model is student and res.summary["method"] == "fitnets"
    assert res.summary["teacher_test_accuracy"] == pytest.approx(teacher.test_accuracy)
    assert res.summary["model"] == "tests.test_api:Net" and (res.run_dir / "model.pt").is_file()
    # the teacher is frozen: not one weight moved
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/hint" in x for x in lines if x["event"] == "epoch")
    # the options are the recipe's keys, written to config.yaml
    cfg = (res.run_dir / "config.yaml").read_text()
    assert "name: fitnets" in cfg and "body.0" in cfg and "name: memory" in cfg


def test_a_model_file_of_a_python_object_says_how_to_load_it(taught):
    teacher, _, _ = taught
    with pytest.raises(ModelError, match=r"passed to kdkit as a Python object.*load_state_dict"):
        kdkit.load(teacher.run_dir / "model.pt")
    state = torch.load(teacher.run_dir / "model.pt", weights_only=True)["state_dict"]
    m = Net(16)
    m.load_state_dict(state)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in teacher.model.state_dict().items())


def test_options_are_validated_like_recipes(taught):
    teacher, loader, out = taught
    with pytest.raises(ConfigError, match=r"unknown option 'temprature' \(did you mean 'method.temperature'"):
        kdkit.distill(teacher.model, Net(4), loader, temprature=4, output_dir=str(out / "x"))
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch' \(did you mean 'epochs'"):
        kdkit.distill(teacher.model, Net(4), loader, **{"train.epoch": 3}, output_dir=str(out / "x"))
    with pytest.raises(ConfigError, match="expected an nn.Module, a zoo model name"):
        kdkit.distill(teacher.model, 3, loader)
    with pytest.raises(ConfigError, match=r"method=: expected a method name such as 'kd', got a dict .*"
                                          r"method='kd', temperature=4"):
        kdkit.distill(teacher.model, Net(4), loader, method={"temperature": 4.0}, output_dir=str(out / "x"))


def test_bad_data_is_a_clear_error(taught):
    teacher, _, out = taught
    x, y = _data()
    with pytest.raises(DataError, match=r"label 12 but the model outputs 10 classes"):
        kdkit.distill(teacher.model, Net(4), (x, y + 3), output_dir=str(out / "y"))
    with pytest.raises(DataError, match="labels must be integer class indices"):
        kdkit.distill(teacher.model, Net(4), (x, y.float()), output_dir=str(out / "y"))
    with pytest.raises(DataError, match=r"expected a DataLoader"):
        kdkit.distill(teacher.model, Net(4), 42, output_dir=str(out / "y"))
    with pytest.raises(DataError, match="data-free and reads no training images"):
        kdkit.distill(teacher.model, Net(4), (x, y), method="dafl", test_data=(x, y), output_dir=str(out / "y"))


def test_a_teacher_that_does_not_fit_the_images_is_a_clear_error(taught, tmp_path):
    teacher, _, _ = taught
    x, y = _data()
    with pytest.raises(ModelError, match=r"the teacher \(Net\) cannot take inputs of shape \(3, 8, 8\): "):
        kdkit.distill(teacher.model, Net(4), (x.expand(-1, 3, -1, -1), y), output_dir=str(tmp_path / "a"))
    features = nn.Sequential(nn.Conv2d(1, 10, 3))  # returns feature maps, not logits
    with pytest.raises(ModelError, match=r"teacher .*Sequential outputs \(2, 10, 6, 6\) for a batch of 2, expected "
                                         r"\(2, 10\) logits"):
        kdkit.distill(features, Net(4), (x, y), output_dir=str(tmp_path / "b"))
    assert features.training  # the probe ran it in eval mode and put it back
    assert not any(tmp_path.iterdir())  # no run folder was written


def test_samples_batches_pairs_and_dataset_names_give_the_same_images():
    from kdkit.data.memory import to_imageset

    x, y = _data(30)
    pair = to_imageset((x, y), "pair")
    batches = to_imageset(DataLoader(TensorDataset(x, y), batch_size=7), "batches")
    samples = to_imageset(TensorDataset(x, y), "samples")
    images_only = to_imageset([x[:10], x[10:]], "images")
    shuffled = to_imageset(DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True), "shuffled")
    assert torch.equal(shuffled.images, pair.images)  # read in order: the global RNG does not matter
    for s in (batches, samples):
        assert torch.equal(s.images, pair.images) and torch.equal(s.labels, pair.labels)
    assert images_only.labels is None and torch.equal(images_only.images, x)
    res = kdkit.train("mlp", "digits", **{"data.image_size": 8, **QUICK, "output_dir": None})
    assert res.summary["data"]["name"] == "digits" and res.run_dir is not None


@pytest.mark.filterwarnings("ignore:.*generated images collapse")  # a few steps of a generator
@pytest.mark.parametrize("script", ["distill_your_own_models.py", "fewshot_grafting.py",
                                    "datafree_your_teacher.py"])
def test_examples_run(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--out", str(tmp_path / "runs")])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "%" in out
    assert (tmp_path / "runs" / "student" / "summary.json").is_file()
