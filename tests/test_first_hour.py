"""What got in a newcomer's way: reruns, user modules under the console script, switching the method on the
command line, training keys in Python, run folders everywhere, ties on a tiny validation split, the
whole run's clock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import kdkit
from kdkit.cli import main
from kdkit.config import load_config
from kdkit.errors import ConfigError, RunWarning

from .conftest import ROOT, digits_overrides

KDKIT = Path(sys.executable).with_name("kdkit")


def _recipe(tmp_path: Path) -> Path:
    r = tmp_path / "recipe.yaml"
    r.write_text(textwrap.dedent("""\
        name: digits-mlp
        output_dir: runs/digits/mlp
        model: {arch: mlp, hidden: [16]}
        data: {name: digits, image_size: 16}
        train: {epochs: 1, optimizer: adam, lr: 0.003, progress: none}
        """))
    return r


def test_rerunning_a_recipe_never_writes_over_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe)]) == 0
    first = (tmp_path / "runs/digits/mlp/model.pt").stat().st_mtime_ns
    assert main(["train", str(recipe)]) == 0  # the recipe's folder holds a run: a fresh one beside it
    assert "runs/digits/mlp holds an earlier run; this run goes to runs/digits/mlp-2" in capsys.readouterr().err
    assert (tmp_path / "runs/digits/mlp-2/model.pt").is_file()
    assert (tmp_path / "runs/digits/mlp/model.pt").stat().st_mtime_ns == first
    assert main(["train", str(recipe), "--overwrite"]) == 0
    assert (tmp_path / "runs/digits/mlp/model.pt").stat().st_mtime_ns != first and not (
        tmp_path / "runs/digits/mlp-3").exists()


def test_python_runs_can_resume_or_overwrite(tmp_path):
    x, y = torch.rand(60, 1, 8, 8), torch.randint(0, 3, (60,))
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    opts = {"train": {"epochs": 2, "progress": "none"}, "output_dir": str(tmp_path / "r")}
    kdkit.train(net, (x, y), **opts)
    with pytest.raises(ConfigError, match=r"already holds a run: continue it with --resume .*\(resume=True in"):
        kdkit.train(net, (x, y), **opts)
    again = kdkit.train(net, (x, y), resume=True, **opts)  # finished: continues nowhere, same summary
    assert again.summary["reached"]["epoch"] == 2
    fresh = kdkit.train(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), (x, y), overwrite=True, **opts)
    assert fresh.run_dir == tmp_path / "r"
    with pytest.raises(ConfigError, match="resume= and overwrite= act on a run folder: give output_dir"):
        kdkit.train(net, (x, y), overwrite=True, train={"epochs": 1})


def test_the_console_script_imports_user_modules_from_the_current_folder(tmp_path):
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""\
        from torch import nn
        def tiny(num_classes=10, in_channels=1, input_size=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, num_classes))
        """))
    args = [a for a in digits_overrides(tmp_path / "run", **{"model.module": "mynets:tiny", "train.epochs": 1})]
    p = subprocess.run([str(KDKIT), "train", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


def test_switching_the_method_drops_the_recipes_other_options_and_keys_can_be_removed():
    with pytest.warns(RunWarning, match="method.name=rdskd: the recipe's method keys ce_weight, kd_weight are "
                                        "options of kd, not of rdskd, and were dropped"):
        cfg = load_config(ROOT / "configs/digits/kd.yaml", ["method.name=rdskd"])
    assert cfg.method.name == "rdskd"
    with pytest.raises(ConfigError, match="unknown key 'method.kd_weight'"):  # given on the command line: checked
        load_config(ROOT / "configs/digits/kd.yaml", ["method.name=rdskd", "method.kd_weight=1"])
    cfg = load_config(ROOT / "configs/digits/kd.yaml", ["~train.epochs", "~method.temperature"])
    assert cfg.train.epochs == 10 and cfg.method.options.temperature == 4.0  # the defaults


def test_training_keys_at_the_top_level_in_python(tmp_path):
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 2, (40,))
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    res = kdkit.train(net, (x, y), epochs=2, lr=0.01, batch_size=8, progress="none", output_dir=str(tmp_path / "r"))
    assert res.summary["stages"][0]["epochs"] == 2 and res.summary["stages"][0]["batch_size"] == 8
    with pytest.raises(ConfigError, match=r"unknown option 'epoch' \(did you mean 'train.epochs'"):
        kdkit.train(net, (x, y), epoch=2)


def test_eval_takes_a_run_folder(tmp_path, teacher_file, capsys):
    assert main(["eval", "--checkpoint", str(teacher_file.parent)]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_ties_on_validation_go_to_the_lower_validation_loss(tmp_path, monkeypatch):
    """On a tiny validation split several epochs reach 100%: the one kept is the one with the lowest loss, not
    the first."""
    from kdkit.engine import trainer

    real = trainer.evaluate
    losses = iter([0.9, 0.5, 0.7])

    def perfect(model, loader, dist=None, task=None):
        out = real(model, loader, dist, task)
        return {**out, "accuracy": 1.0, "loss": next(losses)} if len(loader.data) == 144 else out

    monkeypatch.setattr(trainer, "evaluate", perfect)
    from .conftest import train_run

    res = train_run(tmp_path / "r", **{"train.epochs": 3})
    assert res.summary["selected"]["epoch"] == 2


def test_progress_lines_show_the_whole_runs_clock(tmp_path, capsys):
    from .conftest import train_run

    train_run(tmp_path / "r", **{"train.epochs": 2, "train.progress": "lines"})
    err = capsys.readouterr().err
    assert "[train] epoch 2/2" in err and "[elapsed " in err and " left]" in err


def test_evaluate_from_python_scores_every_training_image(teacher_file):
    """kdkit.evaluate(split="train") scores all training images (no validation set carved out), and its accuracy
    is the one computed by hand from the model file and the raw images."""
    from kdkit.config import DataConfig
    from kdkit.data import load_data

    res = kdkit.evaluate(teacher_file.parent, split="train")
    model = kdkit.load(teacher_file)
    info = model.kdkit_info.info
    train = load_data(DataConfig(name="digits", image_size=info.input_shape[1], val_split=0.0)).train
    x = train.images.float() / 255.0 if train.images.dtype == torch.uint8 else train.images
    x = (x - torch.tensor(info.mean).view(1, -1, 1, 1)) / torch.tensor(info.std).view(1, -1, 1, 1)
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == train.labels).float().mean().item()
    assert res["split"] == "train" and res["count"] == len(train) > 1000
    assert res["accuracy"] == pytest.approx(acc, abs=1e-6)
    with pytest.raises(ConfigError, match="split must be"):
        kdkit.evaluate(teacher_file.parent, split="val")
