"""kdkit export: a standalone student (no teacher, adapters folded) whose outputs are checked against PyTorch."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import kdkit
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.export import export

from .conftest import distill_run


@pytest.fixture(scope="module")
def fitnets_run(tmp_path_factory, cnn_teacher_file):
    """A FitNets run: its hint adapter and the teacher must not be in the export."""
    out = tmp_path_factory.mktemp("export") / "run"
    distill_run(out, cnn_teacher_file, **{"student.arch": "vgg8_bn", "student.width": 0.0625,
                                          "method.name": "fitnets", "train.epochs": 1})
    return out


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict", "onnx"])
def test_export_writes_the_student_alone_and_checks_it(fitnets_run, fmt, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    assert main(["export", str(fitnets_run), "--format", fmt]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["check"]["passed"] and out["check"]["max_abs_diff"] <= 1e-4
    student = kdkit.load(fitnets_run / "model.pt")
    x = torch.randn(3, *out["input_shape"])
    if fmt == "torchscript":
        m = torch.jit.load(out["path"])
        assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in student.parameters())
        assert torch.allclose(m(x), student(x), atol=1e-5)
    elif fmt == "state_dict":
        state = torch.load(out["path"], weights_only=True)
        assert state.keys() == student.state_dict().keys()  # no teacher., no adapter keys
    else:
        import onnxruntime

        s = onnxruntime.InferenceSession(out["path"], providers=["CPUExecutionProvider"])
        got = torch.from_numpy(s.run(None, {"images": x.numpy()})[0])  # another batch size than exported with
        assert torch.allclose(got, student(x), atol=1e-4)


def test_a_mismatching_export_is_an_error(fitnets_run, monkeypatch):
    import kdkit.export as ex

    real = ex._torchscript
    monkeypatch.setattr(ex, "_torchscript", lambda m, x, p: real(m, x, p) + 1e-2)
    with pytest.raises(KdkitError, match=r"outputs differ from the PyTorch model's by 0.01.*do not use"):
        export(fitnets_run, "torchscript")


def test_onnx_without_the_package_says_what_to_install(fitnets_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as when not installed
    with pytest.raises(KdkitError, match=r"needs the onnx and onnxscript packages .*pip install onnx onnxscript"):
        export(fitnets_run, "onnx")


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "holds no model.pt" in capsys.readouterr().err
