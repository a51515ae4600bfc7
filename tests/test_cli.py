"""The command line: one-line errors with exit status 2, JSON outputs, zoo listing, resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kdkit.cli import main

from .conftest import ROOT


def kdkit(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdkit", *args], cwd=cwd, capture_output=True, text=True)


def test_user_error_is_one_line_with_status_2():
    p = kdkit("train", "configs/digits/teacher_lenet5.yaml", "train.epoch=3")
    assert p.returncode == 2
    assert p.stderr.strip() == ("kdkit: error: unknown key 'train.epoch' (did you mean 'epochs'?); valid keys of "
                                "train: " + p.stderr.split("valid keys of train: ")[1].strip())
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["distill", "configs/digits/kd.yaml", "teacher.checkpoint=null", "teacher.arch=lenet5"],
     "needs a trained teacher"),
    (["train", "configs/digits/kd.yaml"], "distills from a teacher; use kdkit distill"),
    (["train", "nope.yaml"], "config file 'nope.yaml' not found"),
    (["eval", "--checkpoint", "nope.pt"], "checkpoint 'nope.pt' not found"),
    (["train", "--resume", "/nonexistent/run"], "no config.yaml there"),
    (["models", "resnet200"], "did you mean 'resnet20'"),
])
def test_more_user_errors(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_models_listing_and_detail(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lenet5 " in out and "61,706" in out and "resnet32x4" in out and "mobilenetv2" in out
    assert main(["models", "resnet8"]) == 0
    out = capsys.readouterr().out
    assert "stages:     layer1, layer2, layer3" in out and "layer2.0.conv1" in out and "fc:input" in out


def test_train_eval_and_resume_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "model.arch=mlp", "data.image_size=16", "train.epochs=2", "train.optimizer=adam",
            "train.lr=0.003", f"output_dir={out}", "train.progress=none"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["run_dir"] == str(out)
    assert main(["eval", "--checkpoint", str(out / "model.pt")]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(summary["test_accuracy"]) and ev["count"] == 359 and ev["data"] == "digits"
    # a finished run resumes to the same result without training again
    assert main(["train", "--resume", str(out)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test_accuracy"] == summary["test_accuracy"]


def test_eval_rejects_a_corrupt_model_file(tmp_path, capsys):
    (tmp_path / "m.pt").write_bytes(b"\x80\x02garbage")
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt")]) == 2
    assert "is corrupt or not a PyTorch file" in capsys.readouterr().err


def test_help_lists_the_commands():
    p = kdkit("--help")
    assert p.returncode == 0
    for cmd in ("train", "distill", "eval", "models", "demo", "compare", "torchrun"):
        assert cmd in p.stdout


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    import signal
    import time

    import torch

    out = tmp_path / "run"
    args = ["train", "model.arch=mlp", "data.image_size=16", "train.epochs=40", "train.optimizer=adam",
            f"output_dir={out}", "train.progress=lines"]
    p = subprocess.Popen([sys.executable, "-m", "kdkit", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and '"event": "epoch"' in metrics.read_text()):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "checkpoint saved; continue with --resume" in err and "Traceback" not in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 1 <= state["position"]["epoch"] < 40
    assert not (out / "model.pt").exists()
    assert main(["train", "--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"][0]["epochs"] == 40 and (out / "model.pt").exists()


def test_demo_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("teacher (LeNet-5)", "student alone (LeNet-5-half)", "student with KD"):
        assert row in out
    assert "61,706" in out and "15,738" in out
    for run in ("teacher", "student", "kd"):
        assert (tmp_path / run / "summary.json").exists()
