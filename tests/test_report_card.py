"""The report card in every summary.json: accuracy, parameters, MACs, size, CPU latency, agreement."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import kdkit
from kdkit.data import BatchLoader
from kdkit.data.images import ImageSet
from kdkit.engine.evaluate import agreement, predictions
from kdkit.measure import count_macs, model_card, size_bytes

from .conftest import distill_run


def test_macs_match_a_hand_count():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    # conv: 4 output channels x 64 positions x 9 weights; linear: 256 x 10
    assert count_macs(conv, (1, 8, 8)) == 4 * 64 * 9 + 256 * 10
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8)) == 640


def test_size_and_card_fields():
    m = nn.Linear(100, 10)
    assert 4 * 1010 < size_bytes(m) < 4 * 1010 + 2000  # the float32 weights plus torch.save's framing
    card = model_card(m, (100,), 0.5)
    assert card["params"] == 1010 and card["macs"] == 1000 and card["test_accuracy"] == 0.5
    assert card["cpu_latency_ms_batch1"] > 0 and card["cpu_latency_ms_per_image_batch64"] > 0


def test_agreement_counts_equal_top1_predictions():
    x = torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8)
    loader = BatchLoader(ImageSet(x, torch.zeros(10, dtype=torch.long)), 4, shuffle=False, drop_last=False,
                         mean=[0.0], std=[1.0])
    a = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    b = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    same = (predictions(a, loader) == predictions(b, loader)).float().mean().item()
    assert agreement(a, b, loader) == pytest.approx(same) and agreement(a, a, loader) == 1.0


@pytest.mark.timed
def test_distill_summary_has_the_report_card(tmp_path, teacher_file):
    res = distill_run(tmp_path / "r", teacher_file)
    card = res.summary["report_card"]
    s, t = card["student"], card["teacher"]
    assert s["test_accuracy"] == res.summary["test_accuracy"] and t["test_accuracy"] == res.summary[
        "teacher_test_accuracy"]
    assert s["params"] == res.summary["params"] and t["params"] == res.summary["teacher_params"]
    teacher = kdkit.load(teacher_file)
    assert t["macs"] == count_macs(teacher, (1, 16, 16)) and s["macs"] < t["macs"]
    assert card["compression"]["params"] == pytest.approx(t["params"] / s["params"])
    assert 0.0 <= card["top1_agreement"] <= 1.0
    assert s["cpu_latency_ms_batch1"] > 0 and t["cpu_latency_ms_per_image_batch64"] > 0


def test_tensorboard_logging_writes_scalars_or_says_what_to_install(tmp_path, monkeypatch):
    import types

    from kdkit.cli import main

    from .conftest import digits_overrides, train_run

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when tensorboard is not installed
    args = ["train", *digits_overrides(tmp_path / "a", **{"model.arch": "mlp", "logging.tensorboard": "true"})]
    assert main(args) == 2
    assert not (tmp_path / "a").exists()

    written: list[tuple[str, float, int]] = []

    class Writer:  # records what kdkit hands to TensorBoard's SummaryWriter
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    res = train_run(tmp_path / "b", **{"logging.tensorboard": "true", "train.log_every": 5})
    epochs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    got = {(tag, step): v for tag, v, step in written}
    for e in epochs:
        assert got[("epoch/val/accuracy", e["global_step"])] == e["val/accuracy"]
    assert any(tag == "step/train/ce" for tag, _, _ in written)


def test_report_of_finished_running_and_several_runs(tmp_path, teacher_file, capsys):
    from kdkit.cli import main

    from .test_datafree import _datafree

    kd = distill_run(tmp_path / "kd", teacher_file)
    free = _datafree(tmp_path / "free", teacher_file, "rdskd", **{"method.generator_epochs": 2})
    running = tmp_path / "running"  # a run still in its second epoch: metrics, no summary yet
    running.mkdir()
    lines = (kd.run_dir / "metrics.jsonl").read_text().splitlines()
    first_epoch = next(i for i, x in enumerate(lines) if '"event": "epoch"' in x)
    (running / "metrics.jsonl").write_text("\n".join(lines[:first_epoch + 1]) + '\n{"time": 1, "ev')  # mid-write
    assert main(["report", str(kd.run_dir), str(free.run_dir), str(running), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out.split()
    assert str(free.run_dir / "generated.png") in printed and str(free.run_dir / "stages.png") in printed
    page = (kd.run_dir / "report.md").read_text()
    assert "## Report card" in page and "| test accuracy |" in page and "agree on" in page
    free_page = (free.run_dir / "report.md").read_text()
    assert "![generated](generated.png)" in free_page and "![samples](samples/student_epoch002.png)" in free_page
    assert "In progress: 1 epoch(s) logged." in (running / "report.md").read_text()
    table = (tmp_path / "cmp" / "report.md").read_text()
    assert table.count("| finished |") == 2 and "in progress (1 epochs)" in table
    assert f"{100 * kd.summary['test_accuracy']:.2f}%" in table and "rdskd" in table


@pytest.mark.timed
def test_latency_reports_quartiles_and_says_when_it_cannot_be_trusted(tmp_path, teacher_file, monkeypatch):
    import os

    from kdkit.measure import busy_note, latency_stats

    st = latency_stats(nn.Linear(100, 10), (100,), 1, repeats=30, warmup=5)
    assert st["q1"] <= st["median"] <= st["q3"] and st["calls"] == 30
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert busy_note([{"median": 1.0, "q1": 0.9, "q3": 1.1}]) is None
    assert "spread widely (interquartile range up to 150%" in busy_note([{"median": 1.0, "q1": 0.5, "q3": 2.0}])
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert "the machine was busy (1-minute load 9.0" in busy_note([{"median": 1.0, "q1": 0.9, "q3": 1.1}])
    res = distill_run(tmp_path / "r", teacher_file, **{"train.epochs": 1})
    card = res.summary["report_card"]
    assert "machine was busy" in card["latency_note"] and card["compression"]["speedup_batch1"] is None
    assert len(card["student"]["cpu_latency_ms_batch1_quartiles"]) == 2
    from kdkit.report import report

    report([res.run_dir])
    assert "time the models on a quiet machine" in (res.run_dir / "report.md").read_text()


@pytest.mark.timed
def test_a_zero_latency_budget_times_nothing_and_the_report_still_renders(tmp_path, teacher_file, monkeypatch):
    import kdkit.measure

    def no_timing(*a, **kw):
        raise AssertionError("latency was timed with train.latency_budget_s=0")

    monkeypatch.setattr(kdkit.measure, "latency_stats", no_timing)
    res = distill_run(tmp_path / "r", teacher_file, **{"train.epochs": 1, "train.latency_budget_s": 0})
    card = res.summary["report_card"]
    for who in ("student", "teacher"):
        assert card[who]["cpu_latency_ms_batch1"] is None and card[who]["cpu_latency_ms_per_image_batch64"] is None
        assert card[who]["params"] > 0 and card[who]["macs"] > 0
    assert card["compression"]["speedup_batch1"] is None and "not timed" in card["latency_note"]
    from kdkit.report import report

    report([res.run_dir])
    text = (res.run_dir / "report.md").read_text()
    assert "| CPU latency, batch 1 | - | - |" in text and "Latency: not timed (train.latency_budget_s=0)." in text
