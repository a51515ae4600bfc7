"""kdkit export: a standalone student (no teacher, adapters folded) whose outputs are checked against PyTorch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import kdkit
from kdkit.cli import main
from kdkit.errors import KdkitError
from kdkit.exporting import export

from .conftest import distill_run


@pytest.fixture(scope="module")
def fitnets_run(tmp_path_factory, cnn_teacher_file):
    """A FitNets run: its hint adapter and the teacher must not be in the export."""
    out = tmp_path_factory.mktemp("export") / "run"
    distill_run(out, cnn_teacher_file, **{"student.arch": "vgg8_bn", "student.width": 0.0625,
                                          "method.name": "fitnets", "train.epochs": 1})
    return out


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "state_dict", "onnx"])
def test_export_writes_the_student_alone_and_checks_it(fitnets_run, fmt, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    assert main(["export", str(fitnets_run), "--format", fmt]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["check"]["passed"] and out["check"]["max_abs_diff"] <= 1e-4
    student = kdkit.load(fitnets_run / "model.pt")
    x = torch.randn(3, *out["input_shape"])
    sidecar = json.loads(Path(out["sidecar"]).read_text())  # what whoever deploys it needs, beside the file
    assert sidecar["classes"] == student.kdkit_info.info.classes and sidecar["input_shape"] == out["input_shape"]
    assert sidecar["preprocessing"]["mean"] == student.kdkit_info.info.mean and not sidecar["preprocessing"]["in_graph"]
    if fmt == "pt2":
        m = torch.export.load(out["path"]).module()
        assert torch.allclose(m(x), student(x), atol=1e-5)  # another batch size than exported with
    elif fmt == "torchscript":
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
    import kdkit.exporting as ex

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


def test_preprocessing_can_go_into_the_graph(fitnets_run):
    res = export(fitnets_run, "pt2", preprocessing=True)
    assert res["preprocessing"]["in_graph"] and res["preprocessing"]["input"] == "pixels in 0..255"
    m = torch.export.load(res["path"]).module()
    student = kdkit.load(fitnets_run / "model.pt")
    info = student.kdkit_info.info
    pixels = torch.randint(0, 256, (4, *info.input_shape)).float()
    mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
    assert torch.allclose(m(pixels), student((pixels / 255 - mean) / std), atol=1e-5)
    with pytest.raises(KdkitError, match="a state_dict has no graph"):
        export(fitnets_run, "state_dict", preprocessing=True)


MAIN_SCRIPT = """
import sys, torch, kdkit
from torch import nn

class Student(nn.Module):  # defined in __main__: another process cannot import it
    def __init__(self, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)

g = torch.Generator().manual_seed(0)
x = torch.rand(90, 1, 8, 8, generator=g)
y = (x.mean(dim=(1, 2, 3)) * 3).long().clamp(max=2)
res = kdkit.train(Student(16), (x, y), test_data=(x, y), train={"epochs": 1, "progress": "none"},
                  output_dir=sys.argv[1])
print(res.summary["exported_program"])
"""


def test_a_student_defined_in_the_users_script_exports_from_its_run_folder(tmp_path):
    """kdkit cannot rebuild a __main__ class in another process: the run keeps its exported program, and every
    format exports from it, from the CLI as from Python."""
    import subprocess

    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", MAIN_SCRIPT, str(run)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "model.pt2"
    for fmt in ("pt2", "onnx", "state_dict"):
        if fmt == "onnx":
            pytest.importorskip("onnxscript")
        res = export(run, fmt)
        assert res["check"] == "skipped: onnxruntime is not installed (pip install onnxruntime to check the outputs)" \
            or res["check"]["passed"]
    assert main(["export", str(run), "--format", "pt2", "--out", str(tmp_path / "s.pt2")]) == 0
    assert (tmp_path / "s.pt2.json").is_file()
