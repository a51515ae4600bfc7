"""summary.json tells the truth about every run: where it stopped and why, what each stage used, which state
was kept against the last one, what the run read, and the pairing fingerprints comparisons check.

Each field a comparison reads (accuracy, selected and reached epoch, steps, batch, wall time, faults,
collapse, pairing) is checked on a run stopped early, a resumed run and multi-stage runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkit.config import load_config
from kdkit.errors import ConfigError
from kdkit.run import execute

from .conftest import ROOT, crash_at, digits_overrides, distill_run, train_run

COMPARED = ("test_accuracy", "test_accuracy_last", "val_accuracy", "val_accuracy_last", "reached", "selected",
            "stopped_by", "stopped_by_time_budget", "global_batch_size", "faults", "pairing")


def _stage_facts(summary):
    keep = ("stage", "epochs", "batch_size", "steps_per_epoch", "steps", "reached", "completed", "stopped_by",
            "lr_end", "selected", "selected_epoch", "data_order")
    return [{k: st.get(k) for k in keep} for st in summary["stages"]]


def test_a_budget_stopped_run_says_where_it_stopped_and_what_it_kept(tmp_path, teacher_file):
    """A time budget that ends training in its first step: the summary gives the epoch and step reached, that
    the budget stopped it, and the epoch kept, instead of the planned epochs."""
    res = distill_run(tmp_path / "r", teacher_file, **{"train.epochs": 5, "train.time_budget_min": 1e-9})
    s = res.summary
    assert s["stopped_by_time_budget"] and s["stopped_by"] == "time_budget"
    assert s["reached"] == {"stage": "distill", "epoch": 1, "step": 1, "epochs": 5, "steps_per_epoch": 20}
    st = s["stages"][0]
    assert st["completed"] is False and st["stopped_by"] == "time_budget" and st["steps"] == 1
    assert st["selected_epoch"] == 1 and s["selected"] == {"stage": "distill", "rule": "best_val", "epoch": 1}
    assert st["lr_end"]["student"] == 0  # the schedule ends at the budget: the cosine reached its end
    assert s["wall_time_s"] >= s["train_time_s"] > 0
    cut = distill_run(tmp_path / "cut", teacher_file, **{"train.epochs": 5, "train.time_budget_min": 1e-9,
                                                         "train.schedule_to_budget": False})
    assert cut.summary["stages"][0]["lr_end"]["student"] > 0  # the budget cut the planned cosine near its start


def test_a_resumed_run_reports_what_an_uninterrupted_one_does(tmp_path, teacher_file, monkeypatch):
    extra = {"train.epochs": 3, "train.deterministic": True, "train.checkpoint_every": 7,
             "teacher.checkpoint": str(teacher_file), "student.arch": "mlp", "student.hidden": "[32]"}
    ref = execute(load_config(None, digits_overrides(tmp_path / "ref", **extra)), "distill").summary
    cfg = load_config(None, digits_overrides(tmp_path / "cut", **extra))
    crash_at(cfg, 30, monkeypatch)  # inside epoch 2
    res = execute(cfg, "distill", resume=True).summary
    assert {k: res[k] for k in COMPARED} == {k: ref[k] for k in COMPARED}
    assert _stage_facts(res) == _stage_facts(ref)
    assert ref["stages"][0]["steps"] == 60 and ref["reached"]["epoch"] == 3 and ref["stopped_by"] is None
    # the wall time counts the crashed process up to its last checkpoint, not only the resuming one
    assert res["wall_time_s"] > res["process_wall_time_s"] > 0 and res["wall_time_s"] >= res["train_time_s"]
    assert ref["wall_time_s"] == pytest.approx(ref["process_wall_time_s"], abs=0.05)


def test_multi_stage_runs_record_each_stage_as_it_ran(tmp_path, cnn_teacher_file):
    """Network grafting trains every stage at its own batch (64 here, not train.batch_size), on the few-shot
    images: the summary's batch is the one used, per stage and overall."""
    cfg = load_config(None, digits_overrides(tmp_path / "g", **{
        "teacher.checkpoint": str(cnn_teacher_file), "student.arch": "vgg8_bn", "student.width": 0.0625,
        "method.name": "netgraft", "data.shots_per_class": 5, "method.block_epochs": 1, "method.net_epochs": 1,
        "method.batch_size": 16, "method.scale_with_shots": False, "train.batch_size": 128}))
    s = execute(cfg, "distill").summary
    assert s["global_batch_size"] == 16 and all(st["batch_size"] == 16 for st in s["stages"])
    assert all(st["steps_per_epoch"] == 4 and st["steps"] == 4 for st in s["stages"])  # 50 images, last batch kept
    assert s["reached"]["stage"] == s["stages"][-1]["stage"] and s["selected"]["rule"] == "last"
    assert s["test_accuracy_last"] == s["test_accuracy"]


def test_best_against_last_is_the_last_states_own_accuracy(tmp_path, teacher_file, monkeypatch):
    """When validation keeps an earlier epoch, test_accuracy_last is what the run would have reported with
    train.select=last (same seed, deterministic): the last state is scored, not guessed."""
    from kdkit.engine import trainer

    real = trainer.evaluate
    calls = []

    def val_gets_worse(model, loader, dist=None, task=None):  # validation says epoch 1 was best; test untouched
        out = real(model, loader, dist, task)
        if len(loader.data) == 144:  # the digits validation split
            calls.append(1)
            out = {**out, "accuracy": 1.0 - 0.1 * len(calls)}
        return out

    extra = {"train.epochs": 3, "train.deterministic": True}
    monkeypatch.setattr(trainer, "evaluate", val_gets_worse)
    best = distill_run(tmp_path / "best", teacher_file, **extra).summary
    monkeypatch.setattr(trainer, "evaluate", real)
    last = distill_run(tmp_path / "last", teacher_file, **extra, **{"train.select": "last"}).summary
    assert best["selected"]["epoch"] == 1 and best["reached"]["epoch"] == 3
    assert best["test_accuracy_last"] == last["test_accuracy"] == last["test_accuracy_last"]
    assert best["pairing"] == last["pairing"]


def test_pairing_fingerprints_match_across_methods_with_the_same_seed(tmp_path, teacher_file):
    """The student alone and KD with the same seed start from the same weights and read the images in the same
    order (what a paired comparison needs); another seed changes both."""
    alone = train_run(tmp_path / "alone", **{"model.arch": "mlp", "model.hidden": "[32]", "seed": 3}).summary
    kd = distill_run(tmp_path / "kd", teacher_file, **{"seed": 3}).summary
    other = distill_run(tmp_path / "other", teacher_file, **{"seed": 4}).summary
    assert alone["pairing"] == kd["pairing"]
    assert other["pairing"]["student_init"] != kd["pairing"]["student_init"]
    assert other["pairing"]["data_order"] != kd["pairing"]["data_order"]


def test_a_recipe_pointed_at_other_data_is_named_for_what_it_read(tmp_path, teacher_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "kd.yaml"
    recipe.write_text("name: mnist-kd-mlp\noutput_dir: runs/mnist/kd\nstudent: {arch: mlp}\n")
    args = [a for a in digits_overrides(tmp_path / "unused", **{"teacher.checkpoint": str(teacher_file)})
            if not a.startswith("output_dir=")]
    res = execute(load_config(recipe, args), "distill")
    assert res.summary["name"] == "digits-kd-mlp" and res.summary["recipe_name"] == "mnist-kd-mlp"
    assert res.run_dir == Path("runs/digits/kd") and not Path("runs/mnist").exists()
    saved = (res.run_dir / "config.yaml").read_text()
    assert "name: digits-kd-mlp" in saved
    # a folder given explicitly is used as given (kdkit compare relies on it), only the name follows the data
    res = execute(load_config(recipe, [*args, "output_dir=runs/mnist/explicit"]), "distill")
    assert res.run_dir == Path("runs/mnist/explicit") and res.summary["name"] == "digits-kd-mlp"
    # kmnist and fashion-mnist are names of their own, not "mnist" with something around it
    from kdkit.run import named_for_data

    for data, want in (("kmnist", ("kmnist-kd", "runs/kmnist/x")), ("mnist", ("mnist-kd", "runs/mnist/x"))):
        c = load_config(None, ["name=fashion-mnist-kd", f"data.name={data}"])
        c.output_dir = "runs/kmnist/x"  # as from a recipe file
        assert (named_for_data(c).name, named_for_data(c).output_dir) == want


def test_warnings_name_the_run_and_the_option_not_kdkits_source(tmp_path, teacher_file):
    """A collapse warning on the command line is one line about the run (its folder, epoch, the option to act on),
    without a line of kdkit's own code."""
    out = tmp_path / "run"
    args = digits_overrides(out, **{
        "teacher.checkpoint": str(teacher_file), "student.arch": "mlp", "student.hidden": "[32]",
        "method.name": "dafl", "method.steps_per_epoch": 4, "data.val_split": 0, "train.select": "last",
        "train.batch_size": 32, "method.diagnostics_samples": 64, "method.grid_images": 0, "train.epochs": 1,
        "method.generator_width": 16, "method.latent_dim": 16, "method.collapse_min_diversity": 100.0,
        "method.on_collapse": "continue"})
    p = subprocess.run([sys.executable, "-m", "kdkit", "distill", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stderr.splitlines() if "collapsed" in x]
    assert len(lines) == 1 and lines[0].startswith(f"kdkit: warning: {out}: [joint] epoch 1: the generated images")
    assert "method.on_collapse=restart or stop" in lines[0]
    assert "datafree.py" not in p.stderr and "on_epoch_end" not in p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["report_card"]["generator_collapse"]["events"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["method_run_state"]["collapses"]


def test_vs_alone_trains_the_student_alone_beside_and_reports_the_paired_difference(tmp_path, teacher_file):
    res = distill_run(tmp_path / "kd", teacher_file, **{"train.vs_alone": True, "train.deterministic": True})
    v = res.summary["vs_alone"]
    alone = train_run(tmp_path / "alone", **{"model.arch": "mlp", "model.hidden": "[32]",
                                             "train.deterministic": True}).summary
    assert v["student_alone_test_accuracy"] == alone["test_accuracy"]  # the same run as `kdkit train` would make
    assert v["difference"] == pytest.approx(res.summary["test_accuracy"] - alone["test_accuracy"])
    assert v["same_init"] and v["same_data_order"] and (res.run_dir / "alone" / "model.pt").is_file()
    assert res.summary["report_card"]["vs_student_alone"] == v
    assert json.loads((res.run_dir / "summary.json").read_text())["vs_alone"] == v
    with pytest.raises(ConfigError, match="no student-alone baseline"):
        distill_run(tmp_path / "g", teacher_file, **{"train.vs_alone": True, "method.name": "netgraft",
                                                     "data.shots_per_class": 2})


def test_json_files_are_standard_json_with_null_for_non_finite_numbers(tmp_path):
    from kdkit.jsonfile import write_json

    f = tmp_path / "new" / "x.json"
    write_json(f, {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": "nan", "e": 3}})
    assert json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": None, "b": [1.5, None, [None, 2]], "c": {"d": "nan", "e": 3}}
    write_json(f, {"a": 1})  # replaced whole, nothing left beside it
    assert json.loads(f.read_text()) == {"a": 1} and [p.name for p in f.parent.iterdir()] == ["x.json"]
