"""The queue tools of benchmarks/: archive_runs.py keeps finished runs in git and puts them back, and
queue_status.py counts what is left and its cost from the runs (under runs/ or in the archive)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from kdkit.compare import load_spec, plan

from .test_compare import _spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import archive_runs
import queue_status


def _finish(run_dir: Path, wall: float | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("name: x\n")
    if wall is not None:
        (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": wall}))
        (run_dir / "metrics.jsonl").write_text("")


def test_queue_status_counts_runs_and_archive_round_trips(tmp_path):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({**_spec(tmp_path / "out"), "also": ["reached.step"]}))
    runs = {(r.arm, r.seed): r for r in plan(load_spec(spec_file))}
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / "compare.reached_step.md").write_text("the report on a further metric")
    _finish(runs["student", 0].run_dir, 120.0)  # finished in 2 minutes
    _finish(runs["student", 1].run_dir, None)  # started, not finished: a worker resumes it
    teacher = next(r for r in runs.values() if r.seed is None).run_dir
    _finish(teacher, 60.0)
    for name in ("model.pt", "head.pt", "checkpoint.pt"):  # an embedding teacher: head sharing reads head.pt
        (teacher / name).write_bytes(name.encode())
    archive = tmp_path / "archive"

    def rows() -> dict[str, dict]:
        return {r["arm"]: r for r in queue_status.status(spec_file, archive)}

    before = rows()
    assert (before["student"]["finished"], before["student"]["started"], before["student"]["pending"]) == (1, 1, 0)
    assert before["student"]["minutes_left"] == pytest.approx(2.0)  # one run left at the finished run's 120 s
    assert before["kd"]["pending"] == 2 and before["kd"]["minutes_left"] is None  # nothing finished to time it by

    assert archive_runs.main(["save", str(spec_file), "--archive", str(archive)]) == 0
    kept = archive / "tiny" / runs["student", 0].run_dir.relative_to(tmp_path / "out") / "summary.json"
    assert kept.is_file() and (archive / "tiny" / "compare.reached_step.md").is_file()
    assert not (archive / "tiny" / runs["student", 1].run_dir.relative_to(tmp_path / "out")).exists()

    shutil.rmtree(tmp_path / "out")  # a fresh checkout: only the archive is left
    after = rows()
    assert (after["student"]["finished"], after["student"]["started"], after["student"]["pending"]) == (1, 0, 1)
    assert archive_runs.main(["restore", str(spec_file), "--archive", str(archive)]) == 0
    assert json.loads((runs["student", 0].run_dir / "summary.json").read_text()) == {"wall_time_s": 120.0}
    assert (teacher / "model.pt").read_bytes() == b"model.pt" and (teacher / "head.pt").read_bytes() == b"head.pt"
    assert not (teacher / "checkpoint.pt").exists()


def test_means_table_puts_cells_side_by_side_with_the_paired_difference():
    import per_seed

    iv = {"n": 3, "mean": 0.9, "half_width": 0.01, "low": 0.89, "high": 0.91}
    diff = {"n": 3, "mean": -0.005, "half_width": 0.002, "low": -0.007, "high": -0.003}
    report = {"metric": "test_accuracy", "baseline": "alone", "cells": {
        "data=a": {"arms": {"alone": {"metric": iv}, "kd": {"metric": iv}},
                   "pairs": [{"arm": "kd", "against": "alone", "diff": diff}]},
        "data=b": {"arms": {"alone": {"metric": iv}}, "pairs": []}}}
    rows = per_seed.means_table(report).splitlines()[2:]
    assert rows[1] == "|---|---|---|---|---|"
    assert rows[3] == "| kd | 90.00 +- 1.00 (3) | -0.50 [-0.70, -0.30] (3) | not run yet |  |"
    # one cell, differences against several arms, the wall time; only the arms asked for, in that order
    report["cells"]["data=a"]["arms"]["kd"]["wall_s"] = {"n": 3, "mean": 390.0}
    rows = per_seed.means_table(report, 1, cells=["data=a"], arms=["kd", "alone"], against=["alone", "kd"],
                                wall=True).splitlines()
    assert rows[0].endswith("against alone, kd: paired difference in points [95% interval] (paired seeds); "
                            "wall time of a run (min)")
    assert rows[2] == "| arm | data=a | vs alone | vs kd | min per run |"
    assert rows[4:] == ["| kd | 90.0 +- 1.0 (3) | -0.5 [-0.7, -0.3] (3) |  | 6.5 |",
                        "| alone | 90.0 +- 1.0 (3) |  |  |  |"]
    with pytest.raises(SystemExit, match="no cell data=c in the report; its cells: data=a, data=b"):
        per_seed.means_table(report, cells=["data=c"])
    with pytest.raises(SystemExit, match="no arm dist in the report; its arms: alone, kd"):
        per_seed.means_table(report, against=["dist"])


def test_quiet_host_waits_until_the_host_takes_little_cpu(monkeypatch, capsys):
    import common

    from kdkit import cpu_steal

    probes = iter([0.5, 0.3, 0.02])  # two busy probes, then a quiet one
    monkeypatch.setattr(cpu_steal.StealMeter, "fraction", lambda self: next(probes))
    waits: list[float] = []
    monkeypatch.setattr(common.time, "sleep", waits.append)
    assert common.quiet_host(0.05, probe_s=0.01, wait_s=7.0) == 0.02
    assert waits == [7.0, 7.0] and "CPU steal 50%" in capsys.readouterr().out
    monkeypatch.setattr(cpu_steal.StealMeter, "fraction", lambda self: None)  # no /proc/stat: nothing to wait for
    assert common.quiet_host(0.05, probe_s=0.01) is None
