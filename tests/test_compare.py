"""kdkit compare: the interval arithmetic by hand, spec checks before any work, pairing, a killed queue that
continues without redoing finished runs, and the report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from kdkit.compare import budget_estimate_s, compare, dry_run, load_spec, longest_first_order, parse_until, plan
from kdkit.config import load_config
from kdkit.errors import ConfigError, KdkitError
from kdkit.stats import mean_ci, paired

from .conftest import crash_at

COMMON = ["data.name=digits", "data.image_size=16", "train.epochs=2", "train.batch_size=64", "train.optimizer=adam",
          "train.lr=0.003", "train.weight_decay=0", "train.progress=none"]


def _spec(out, **extra):
    spec = {
        "name": "tiny", "out": str(out), "seeds": [0, 1], "baseline": "student", "set": COMMON,
        "prepare": {"teacher": {"command": "train", "set": ["model.arch=mlp", "model.hidden=[64]", "train.epochs=4"]}},
        "arms": {
            "student": {"command": "train", "set": ["model.arch=mlp", "model.hidden=[32]"]},
            "kd": {"command": "distill", "set": ["student.arch=mlp", "student.hidden=[32]",
                                                 "teacher.checkpoint={teacher}/model.pt"]},
        },
    }
    spec.update(extra)
    return spec


def test_intervals_match_a_hand_computation():
    # three values 0.90, 0.92, 0.91: mean .91, sd .01, t(.975, 2) = 4.302653
    iv = mean_ci([0.90, 0.92, 0.91])
    assert iv.mean == pytest.approx(0.91) and iv.sd == pytest.approx(0.01)
    assert iv.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-6)
    # paired: d = [.02, .01, .00] over the common seeds 1, 2, 3 (seed 4 of a has no partner)
    p = paired({1: 0.90, 2: 0.92, 3: 0.91, 4: 0.5}, {1: 0.88, 2: 0.91, 3: 0.91})
    assert p.seeds == [1, 2, 3] and (p.wins, p.losses, p.ties) == (2, 0, 1)
    assert p.diff.mean == pytest.approx(0.01) and p.diff.sd == pytest.approx(0.01)
    assert p.diff.half_width == pytest.approx(0.024841, rel=1e-4) and p.verdict == "cannot tell"
    # unpaired, the same arms' intervals overlap widely; paired, a consistent +1 point is 'higher'
    q = paired({s: 0.90 + 0.03 * (s % 3) + 0.01 for s in range(10)}, {s: 0.90 + 0.03 * (s % 3) for s in range(10)})
    assert q.diff.sd == pytest.approx(0.0, abs=1e-12) and q.verdict == "higher"
    assert math.isnan(mean_ci([0.5]).half_width) and paired({0: 1.0}, {0: 0.0}).verdict == "cannot tell"
    # the 95% t quantile for 9 degrees of freedom
    assert mean_ci(list(range(10))).half_width == pytest.approx(2.262157 * math.sqrt(110 / 12) / math.sqrt(10),
                                                                 rel=1e-6)


@pytest.mark.parametrize("change,message", [
    ({"armz": {}}, r"unknown key 'armz' \(did you mean 'arms'\?\)"),
    ({"baseline": "studnet"}, r"baseline 'studnet' is not an arm \(did you mean 'student'\?\)"),
    ({"seeds": [0, 0]}, "seeds is a count or a list of distinct integers"),
    ({"contrasts": [["kd", "nope"]]}, r"contrast \['kd', 'nope'\] is not a pair of arm names"),
    ({"arms": {"student": {"command": "train", "config": "nowhere.yaml"}}}, r"arms.student.config: 'nowhere.yaml' "
                                                                              "not found"),
    ({"arms": {"student": {"command": "train", "seeds": [1, 5]}}}, r"arms.student.seeds \[5\] are not among the "
                                                                   r"spec's seeds \[0, 1\]"),
    ({"arms": {"student": {"command": "train", "seeds": 2}}}, r"arms.student.seeds: .*a non-empty list"),
    ({"prepare": {"teacher": {"command": "train", "seeds": [0]}}}, r"prepare.teacher.seeds: .*prepare runs have no"),
    ({"arms": {"student": {"command": "train", "cells": {"hiden": [16]}}}, "cells": {"hidden": [16, 32]}},
     r"arms.student.cells names 'hiden', which is not a cell variable of the spec \(did you mean 'hidden'\?\)"),
    ({"arms": {"student": {"command": "train", "cells": {"hidden": [16, 64]}}}, "cells": {"hidden": [16, 32]}},
     r"arms.student.cells.hidden \[64\] are not among the spec's values \[16, 32\]"),
    ({"arms": {"student": {"command": "train", "cells": {"hidden": []}}}, "cells": {"hidden": [16]}},
     r"arms.student.cells: .*non-empty lists"),
    ({"prepare": {"teacher": {"command": "train", "cells": {"hidden": [16]}}}, "cells": {"hidden": [16]}},
     r"prepare.teacher.cells: .*prepare runs have no cell"),
    ({"also": [3]}, r"also is a list of further metrics .*got \[3\]"),
])
def test_spec_mistakes_are_one_clear_error(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(_spec(tmp_path / "out", **change))


def test_every_runs_config_is_checked_before_any_work(tmp_path):
    bad = _spec(tmp_path / "out")
    bad["arms"]["kd"]["set"].append("method.temprature=2")
    with pytest.raises(ConfigError, match=r"run all/kd/seed0 \(distill\): unknown key 'method.temprature'"):
        compare(bad, echo=False)
    typo = _spec(tmp_path / "out")
    typo["arms"]["kd"]["set"].append("teacher.checkpoint={teachr}/model.pt")
    with pytest.raises(ConfigError, match=r"unknown placeholder \{teachr\}.*known: \{out\}, \{seed\}, \{teacher\}"):
        compare(typo, echo=False)
    assert not (tmp_path / "out").exists()


def test_cells_expand_into_separate_comparisons(tmp_path):
    spec = load_spec(_spec(tmp_path / "out", cells={"hidden": [16, 32]}, seeds=3))
    runs = plan(spec)
    assert [r.key for r in runs[:5]] == ["prepare/teacher", "hidden=16/student/seed0", "hidden=16/kd/seed0",
                                         "hidden=32/student/seed0", "hidden=32/kd/seed0"]
    assert len(runs) == 1 + 3 * 2 * 2 and runs[1].argv[-1] == "seed=0"


def test_an_arm_may_run_a_subset_of_the_seeds(tmp_path):
    spec = _spec(tmp_path / "out", seeds=3)
    spec["arms"]["kd"]["seeds"] = [0, 2]
    keys = [r.key for r in plan(load_spec(spec))]
    assert keys == ["prepare/teacher", "all/student/seed0", "all/kd/seed0", "all/student/seed1", "all/student/seed2",
                    "all/kd/seed2"]


def test_an_arm_may_run_in_some_cells_only_and_the_report_leaves_it_out_elsewhere(tmp_path):
    from kdkit.compare import ArmResult, markdown, summarize

    raw = _spec(tmp_path / "out", seeds=2, cells={"hidden": [16, 32], "lr": [0.1, 0.2]})
    raw["arms"]["kd"]["cells"] = {"hidden": [32], "lr": [0.1]}
    spec = load_spec(raw)
    keys = [r.key for r in plan(spec)]
    assert [k for k in keys if "/kd/" in k] == ["hidden=32,lr=0.1/kd/seed0", "hidden=32,lr=0.1/kd/seed1"]
    assert sum("/student/" in k for k in keys) == 2 * 4
    # the report: kd is compared with the student in its one cell, and absent (not an error) elsewhere
    student = {c: ArmResult(values={0: 0.8, 1: 0.7}) for c in ("hidden=16,lr=0.1", "hidden=32,lr=0.1")}
    results = {c: {"student": r} for c, r in student.items()}
    results["hidden=32,lr=0.1"]["kd"] = ArmResult(values={0: 0.85, 1: 0.78})
    report = summarize(spec, results)
    (pair,) = report["cells"]["hidden=32,lr=0.1"]["pairs"]
    assert pair["arm"] == "kd" and pair["diff"]["mean"] == pytest.approx(0.065)
    assert report["cells"]["hidden=16,lr=0.1"]["pairs"] == []
    assert "kd" not in report["across_cells"]["arms"] and "student" in report["across_cells"]["arms"]
    assert "kd" in markdown(report)


def test_the_queue_resumes_where_it_stopped_and_reports_paired_differences(tmp_path):
    spec = _spec(tmp_path / "out")
    out = tmp_path / "out"
    compare(spec, max_runs=3, echo=False)  # the teacher, then student and kd with seed 0
    done = {p: p.stat().st_mtime_ns for p in out.glob("all/*/seed0/summary.json")}
    assert len(done) == 2 and not (out / "all" / "student" / "seed1").exists()
    # a run killed mid-way (as by a crash of the machine) is continued from its checkpoint, not restarted
    cut = load_config(None, [*COMMON, "student.arch=mlp", "student.hidden=[32]", "seed=1",
                             f"teacher.checkpoint={out}/prepare/teacher/model.pt", f"output_dir={out}/all/kd/seed1"])
    monkey = pytest.MonkeyPatch()
    try:
        crash_at(cut, 25, monkey)
    finally:
        monkey.undo()
    assert any(line.startswith("resume ") and "all/kd/seed1" in line for line in dry_run(spec))
    report = compare(spec, echo=False)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished runs were not redone
    queue = json.loads((out / "queue.json").read_text())["runs"]
    assert queue["all/kd/seed1"]["attempts"][0]["resumed"] and "--resume" in queue["all/kd/seed1"]["attempts"][0][
        "command"]
    assert all(v["status"] == "finished" for v in queue.values()) and len(queue) == 5
    # the report: per-arm intervals from the summaries, paired difference with pairing checked
    cell = report["cells"]["all"]
    per_seed = {a: {int(s): v for s, v in cell["arms"][a]["per_seed"].items()} for a in ("student", "kd")}
    for a in ("student", "kd"):
        for s in (0, 1):
            summary = json.loads((out / "all" / a / f"seed{s}" / "summary.json").read_text())
            assert per_seed[a][s] == summary["test_accuracy"]
    (pair,) = cell["pairs"]
    d = [per_seed["kd"][s] - per_seed["student"][s] for s in (0, 1)]
    assert pair["diff"]["mean"] == pytest.approx(sum(d) / 2) and pair["same"] == {"student_init": 2, "data_order": 2}
    md = (out / "compare.md").read_text()
    for name in ("compare.json", "queue.json"):  # standard JSON that jq and JavaScript read
        json.loads((out / name).read_text(), parse_constant=lambda c, name=name: pytest.fail(f"{name} holds {c}"))
    assert "| kd | student | 2 |" in md and (out / "compare.png").stat().st_size > 5000
    # rendering again from the runs alone gives the same report
    assert compare(spec, run=False, echo=False) == report
    # further metrics (a dotted path into the summary too): each its own report, the main one unchanged
    also = compare({**spec, "also": ["test_loss", "reached.step"]}, run=False, echo=False)
    assert {k: v for k, v in also.items() if k != "also"} == report
    for metric, stem in (("test_loss", "compare.test_loss"), ("reached.step", "compare.reached_step")):
        got = also["also"][metric]["cells"]["all"]["arms"]["kd"]["per_seed"]
        for s in (0, 1):
            summary = json.loads((out / "all" / "kd" / f"seed{s}" / "summary.json").read_text())
            want = summary["test_loss"] if metric == "test_loss" else summary["reached"]["step"]
            assert got[str(s)] == pytest.approx(want)
        assert json.loads((out / f"{stem}.json").read_text())["metric"] == metric and (out / f"{stem}.md").is_file()
    assert "[reached.step](compare.reached_step.md)" in (out / "compare.md").read_text()
    with pytest.raises(ConfigError, match=r"'test_metrics.eer' is not a number in .*summary.json; numbers there: "
                                          r".*reached.epoch"):
        compare({**spec, "also": ["test_metrics.eer"]}, run=False, echo=False)


def test_until_stops_the_queue_before_a_run_that_would_end_after_the_deadline(tmp_path, capsys):
    spec = _spec(tmp_path / "out")
    out = tmp_path / "out"
    compare(spec, until=time.time() - 1, echo=False)  # the deadline has passed: nothing starts
    assert not (out / "prepare").exists()
    compare(spec, max_runs=2, echo=False)  # the teacher and student/seed0
    summary = out / "all" / "student" / "seed0" / "summary.json"
    s = json.loads(summary.read_text())
    summary.write_text(json.dumps({**s, "wall_time_s": 1e6}))  # the student arm now "takes" 11 days a run
    compare(spec, until="+2h", echo=True)
    # student/seed1 would end after the deadline: skipped; kd (no finished run to time it by) starts, and once
    # timed by its seed 0, its seed 1 fits too
    assert (out / "all" / "kd" / "seed0" / "summary.json").is_file()
    assert (out / "all" / "kd" / "seed1" / "summary.json").is_file()
    assert not (out / "all" / "student" / "seed1").exists()
    printed = capsys.readouterr().out
    assert "skipped all/student/seed1 (about 16667 min)" in printed and "1 run(s) left for after" in printed


def test_until_times_an_untimed_arm_by_its_time_budget(tmp_path, capsys):
    spec = _spec(tmp_path / "out")
    spec["arms"]["kd"]["set"] = [*spec["arms"]["kd"]["set"], "train.time_budget_min=180"]
    runs = {r.key: r for r in plan(load_spec(spec))}
    assert budget_estimate_s(runs["all/kd/seed0"]) == pytest.approx(60 * 180 * 1.05 + 60)
    assert budget_estimate_s(runs["all/student/seed0"]) == 0.0  # no budget: nothing known
    out = tmp_path / "out"
    compare(spec, until="+2h", echo=True)
    # kd has no finished run, but its 3-hour budget ends after the deadline: never started; the students run
    assert not (out / "all" / "kd").exists()
    assert all((out / "all" / "student" / f"seed{s}" / "summary.json").is_file() for s in (0, 1))
    printed = capsys.readouterr().out
    assert "skipped all/kd/seed0 (about 190 min)" in printed and "2 run(s) left for after" in printed


def test_until_times_an_arm_by_the_runs_another_worker_finished_meanwhile(tmp_path, monkeypatch):
    import sys

    queue = sys.modules["kdkit.compare"]
    spec = _spec(tmp_path / "out", seeds=[0, 1, 2])
    out = tmp_path / "out"
    compare(spec, max_runs=1, echo=False)  # the teacher: no arm is timed when the next worker starts
    run_one = queue._run_one

    def and_another_worker_finishes_kd_seed0(r, runs, say):
        if r.key == "all/student/seed0":  # meanwhile another worker finished kd/seed0: 11 days
            (out / "all" / "kd" / "seed0").mkdir(parents=True)
            summary = {"wall_time_s": 1e6, "test_accuracy": 0.5}
            (out / "all" / "kd" / "seed0" / "summary.json").write_text(json.dumps(summary))
        return run_one(r, runs, say)

    monkeypatch.setattr(queue, "_run_one", and_another_worker_finishes_kd_seed0)
    compare(spec, until="+2h", echo=False)
    # kd/seed1 and 2 would end after the deadline by the other worker's kd run: skipped; the students run
    assert not (out / "all" / "kd" / "seed1").exists() and not (out / "all" / "kd" / "seed2").exists()
    assert all((out / "all" / "student" / f"seed{s}" / "summary.json").is_file() for s in (1, 2))


def test_longest_first_takes_untimed_arms_then_the_longest_keeping_the_plan_order_among_equals(tmp_path):
    spec = _spec(tmp_path / "out", arms={
        "student": {"command": "train", "set": ["model.arch=mlp", "model.hidden=[32]"]},
        "kd": {"command": "distill", "set": ["student.arch=mlp", "teacher.checkpoint={teacher}/model.pt"]},
        "kd_long": {"command": "distill", "set": ["student.arch=mlp", "teacher.checkpoint={teacher}/model.pt",
                                                  "train.epochs=9"]}})
    runs = plan(load_spec(spec))
    assert [r.key for r in runs][:4] == ["prepare/teacher", "all/student/seed0", "all/kd/seed0", "all/kd_long/seed0"]
    got = [r.key for r in longest_first_order(runs, {"student": [60.0], "kd": [300.0]})]
    assert got == ["prepare/teacher", "all/kd_long/seed0", "all/kd_long/seed1", "all/kd/seed0", "all/kd/seed1",
                   "all/student/seed0", "all/student/seed1"]
    assert [r.key for r in longest_first_order(runs, {})] == [r.key for r in runs]  # nothing timed: the plan


def test_until_accepts_durations_clock_times_and_dates():
    now = time.mktime((2026, 12, 4, 10, 0, 0, 0, 0, -1))
    assert parse_until("+90m", now) == now + 5400 and parse_until("+2h", now) == now + 7200
    assert parse_until("+30s", now) == now + 30
    assert parse_until("17:30", now) == now + 7.5 * 3600
    assert parse_until("09:00", now) == now + 23 * 3600  # already past today: tomorrow
    assert parse_until("2026-12-05 10:00", now) == now + 86400
    for bad in ("soon", "+5d", "25:99", "2026-13-01 10:00"):
        with pytest.raises(KdkitError, match="not a deadline; give"):
            parse_until(bad, now)


def test_a_run_that_fails_after_starting_is_recorded_and_skipped(tmp_path, monkeypatch):
    spec = _spec(tmp_path / "out", seeds=[0], prepare={}, arms={
        "student": {"command": "train", "set": ["model.arch=mlp", "model.hidden=[32]"]},
        "diverges": {"command": "train", "set": ["model.arch=mlp", "model.hidden=[32]", "train.lr=1e30",
                                                 "train.optimizer=sgd", "train.on_nonfinite=stop"]}})
    report = compare(spec, echo=False)
    assert report["cells"]["all"]["arms"]["diverges"]["failed"] == [0]
    assert "failed: [0]" in (tmp_path / "out" / "compare.md").read_text()
    queue = json.loads((tmp_path / "out" / "queue.json").read_text())["runs"]
    assert queue["all/diverges/seed0"]["status"] == "failed" and queue["all/diverges/seed0"]["attempts"][0][
        "exit_code"] == 2
    compare(spec, echo=False)  # skipped, not retried
    queue = json.loads((tmp_path / "out" / "queue.json").read_text())["runs"]
    assert len(queue["all/diverges/seed0"]["attempts"]) == 1


def test_a_shared_prepare_folder_must_hold_the_same_run(tmp_path):
    shared = str(tmp_path / "teachers" / "mlp")
    spec = _spec(tmp_path / "a")
    spec["prepare"]["teacher"]["dir"] = shared
    compare(spec, max_runs=1, echo=False)  # the teacher only
    again = _spec(tmp_path / "b")  # another comparison reusing that teacher: nothing to redo
    again["prepare"]["teacher"]["dir"] = shared
    assert dry_run(again)[0].startswith("done ")
    other = _spec(tmp_path / "c")
    other["prepare"]["teacher"] = {"command": "train", "dir": shared,
                                   "set": ["model.arch=mlp", "model.hidden=[64]", "train.epochs=5"]}
    with pytest.raises(ConfigError, match=r"holds a run with another config \(in: train\)"):
        dry_run(other)
    with pytest.raises(ConfigError, match="only prepare runs take a folder of their own"):
        load_spec(_spec(tmp_path / "d", arms={"x": {"command": "train", "dir": shared}}))


def test_robustness_over_a_grid_pairs_each_seeds_mean_worst_and_spread():
    from kdkit.compare import ArmResult, Spec, _across_cells

    spec = Spec("g", None, [0, 1, 2], "test_accuracy", "b", [], [], {}, {}, {"lr": [1, 2]}, [])
    a = {"lr=1": ArmResult(values={0: 0.9, 1: 0.8, 2: 0.7}), "lr=2": ArmResult(values={0: 0.7, 1: 0.8, 2: 0.9})}
    b = {"lr=1": ArmResult(values={0: 0.8, 1: 0.8, 2: 0.8}), "lr=2": ArmResult(values={0: 0.8, 1: 0.8})}
    results = {c: {"a": a[c], "b": b[c]} for c in a}
    x = _across_cells(spec, results)
    assert x["arms"]["a"]["mean"]["mean"] == pytest.approx(0.8) and x["arms"]["a"]["mean"]["n"] == 3
    assert x["arms"]["b"]["worst"]["n"] == 2  # seed 2 of b is missing a cell: left out
    (p,) = x["pairs"]
    # seeds 0 and 1: worst a = .7, .8 against b = .8, .8; spread a = sd(.9, .7) = .1414, sd(.8, .8) = 0 against 0, 0
    assert p["worst"]["diff"]["mean"] == pytest.approx(-0.05) and p["worst"]["seeds"] == [0, 1]
    assert p["spread"]["diff"]["mean"] == pytest.approx(math.sqrt(0.02) / 2)


def test_welch_interval_by_hand():
    from kdkit.stats import unpaired

    # a = 1, 2, 3 (mean 2, var 1), b = 2, 4 (mean 3, var 2): se = sqrt(1/3 + 2/2) = 1.1547,
    # df = (1/3 + 1)^2 / ((1/3)^2 / 2 + 1^2 / 1) = 1.7778 / 1.0556 = 1.6842, t(.975, 1.6842) = 5.9454 (scipy)
    iv = unpaired([1, 2, 3], [2, 4])
    assert iv.mean == pytest.approx(-1.0) and iv.sd == pytest.approx(math.sqrt(4 / 3), rel=1e-6)
    from scipy.stats import t

    assert iv.half_width == pytest.approx(t.ppf(0.975, (4 / 3) ** 2 / ((1 / 3) ** 2 / 2 + 1)) * math.sqrt(4 / 3))
    assert math.isnan(unpaired([1.0], [2.0, 3.0]).half_width)



def test_two_workers_share_one_spec_without_running_anything_twice(tmp_path):
    """Two queues started on the same spec at once (two processes): the second waits for the prepare run the
    first makes, then they split the arms; every run is made exactly once and queue.json keeps both records."""
    import subprocess
    import sys

    import yaml

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(tmp_path / "out")), encoding="utf-8")
    workers = [subprocess.Popen([sys.executable, "-m", "kdkit", "compare", str(spec_file)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    queue = json.loads((tmp_path / "out" / "queue.json").read_text())["runs"]
    assert len(queue) == 5 and all(len(v["attempts"]) == 1 and v["status"] == "finished" for v in queue.values())
    assert {v["attempts"][0]["pid"] for v in queue.values()} == {w.pid for w in workers}  # both worked
    import datetime as dt

    def t(a):
        return dt.datetime.strptime(a["started"], "%Y-%m-%d %H:%M:%S").timestamp()

    teacher = queue["prepare/teacher"]["attempts"][0]
    arms = [v["attempts"][0] for k, v in queue.items() if k != "prepare/teacher"]
    assert all(t(a) >= t(teacher) + teacher["wall_s"] - 1 for a in arms)  # no arm before the teacher was made
    assert not list((tmp_path / "out" / "claims").iterdir())  # every claim released


@pytest.mark.parametrize("spec", sorted((Path(__file__).parent.parent / "benchmarks" / "compare").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_comparison_spec_checks(spec, tmp_path, monkeypatch):
    """Each benchmark spec parses and every run's config validates (recipes, overrides, method options)."""
    import yaml

    from kdkit.compare import check

    monkeypatch.chdir(spec.parent.parent.parent)
    data = yaml.safe_load(spec.read_text())
    data["out"] = str(tmp_path / "out")
    if "base" in data:  # a spec given as a dict finds its base from the working directory
        data["base"] = str(spec.parent / data["base"])
        data["prepare"] = yaml.safe_load((spec.parent / data["base"]).read_text()).get("prepare")
    for p in (data.get("prepare") or {}).values():
        p["dir"] = str(tmp_path / "prepare" / Path(p.get("dir", "x")).name)
    check(plan(load_spec(data)))


def test_the_time_left_comes_from_each_arms_finished_runs(tmp_path):
    """minutes_left: the mean wall time of an arm's finished runs times its runs to go; arms with no finished run
    are named, not guessed."""
    from kdkit.compare import finished_walls, minutes_left

    runs = {(r.arm, r.seed): r for r in plan(load_spec(_spec(tmp_path / "out")))}
    d = runs["student", 0].run_dir
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"wall_time_s": 120.0}))
    walls = finished_walls(list(runs.values()))
    assert walls == {"student": [120.0]}
    total, untimed = minutes_left([runs["student", 1], runs["kd", 0], runs["kd", 1]], {"student": [120.0, 60.0]})
    assert total == pytest.approx(1.5) and untimed == ["kd"]


def test_a_spec_reruns_another_specs_arms_through_base(tmp_path):
    """`base:` inherits every key of another spec but its name and results folder; keys given replace the
    base's; a missing base and a cycle are one clear error each."""
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(_spec(tmp_path / "out_a")))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "a.yaml", "arms_set": ["data.train_subset=5"]}))
    a, b = load_spec(tmp_path / "a.yaml"), load_spec(tmp_path / "b.yaml")
    assert b.name == "b" and b.out != a.out and list(b.arms) == list(a.arms) and b.baseline == a.baseline
    assert b.arm_overrides == ["data.train_subset=5"] and b.overrides == a.overrides and b.seeds == a.seeds
    assert all("data.train_subset=5" in r.argv for r in plan(b) if r.seed is not None)
    assert not any("data.train_subset=5" in r.argv for r in plan(b) if r.seed is None)  # prepare runs unchanged
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "missing.yaml"}))
    with pytest.raises(ConfigError, match="base .*missing.yaml does not exist"):
        load_spec(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"base": "e.yaml"}))
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({"base": "d.yaml"}))
    with pytest.raises(ConfigError, match="names itself"):
        load_spec(tmp_path / "d.yaml")


def test_a_runs_wall_time_is_the_larger_of_its_attempts_and_its_summary():
    """A resumed run whose first attempt died with its worker unrecorded: the summary (summed over the run's
    processes) knows more; an old summary that counted the last process only: the attempts know more."""
    from kdkit.compare import run_wall

    assert run_wall([{"wall_s": 1968.7}], {"wall_time_s": 2864.0}) == 2864.0
    assert run_wall([{"wall_s": 100.0}, {"wall_s": 200.0}], {"wall_time_s": 120.0}) == 300.0
    assert run_wall([], {"wall_time_s": 50}) == 50.0 and math.isnan(run_wall([], {}))


def test_attempts_before_a_fresh_start_do_not_count():
    """An interrupted run whose folder was removed and started again: its earlier attempts' work is gone."""
    from kdkit.compare import since_fresh_start

    a = [{"wall_s": 570.0, "resumed": False}, {"wall_s": 10.0, "resumed": True},
         {"wall_s": 906.0, "resumed": False}, {"wall_s": 30.0, "resumed": True}]
    assert since_fresh_start(a) == a[2:]
    assert since_fresh_start(a[:2]) == a[:2] and since_fresh_start([{"wall_s": 5.0}]) == [{"wall_s": 5.0}]


def test_stopping_a_worker_checkpoints_its_run_and_records_the_attempt(tmp_path):
    """SIGTERM to a `kdkit compare` worker (as `pkill -f "kdkit compare"` sends) is passed on to its run, which
    checkpoints at its next step and exits; the worker records the attempt (wall and CPU time) as interrupted and
    exits with 130, leaving no training process behind; the same command resumes the run."""
    import signal
    import subprocess
    import sys

    import yaml

    out = tmp_path / "out"
    spec = {"name": "long", "out": str(out), "seeds": [0], "baseline": "student", "set": COMMON,
            "arms": {"student": {"command": "train", "set": ["model.arch=mlp", "model.hidden=[32]",
                                                             "train.epochs=100000"]}}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec), encoding="utf-8")
    worker = subprocess.Popen([sys.executable, "-m", "kdkit", "compare", str(spec_file)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    metrics = out / "all" / "student" / "seed0" / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.is_file() and '"event": "epoch"' in metrics.read_text()):
        assert worker.poll() is None and time.time() - t0 < 120, "the run did not start"
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 130 and "run the same command to continue" in output, output
    (attempt,) = json.loads((out / "queue.json").read_text())["runs"]["all/student/seed0"]["attempts"]
    assert attempt["exit_code"] == 130 and attempt["wall_s"] > 0 and attempt["cpu_s"] > 0
    assert json.loads((out / "queue.json").read_text())["runs"]["all/student/seed0"]["status"] == "interrupted"
    assert "stopped by signal 15" in (out / "logs" / "all" / "student" / "seed0.log").read_text()
    assert not _processes_naming(str(metrics.parent)) and (metrics.parent / "checkpoint.pt").is_file()
    assert any(line.startswith("resume ") and "all/student/seed0" in line for line in dry_run(spec))


def _processes_naming(text: str) -> list[int]:
    """The live processes whose command line contains `text`."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and text in (p / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(p.name))
        except OSError:  # ended meanwhile
            pass
    return pids


def test_the_command_line_passes_its_queue_options_on(monkeypatch, tmp_path):
    import sys

    import yaml

    from kdkit.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path / "out")))
    seen = {}
    monkeypatch.setattr(sys.modules["kdkit.compare"], "compare", lambda spec, **kw: seen.update(spec=spec, **kw) or 1)
    assert main(["compare", str(path), "--until", "+2h", "--longest-first", "--max-runs", "3"]) == 0
    assert seen == {"spec": str(path), "run": True, "max_runs": 3, "retry_failed": False, "until": "+2h",
                    "longest_first": True}
