"""benchmarks/claims.py: the verdict read off the paired interval, by hand, and the table written into its place."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """Import benchmarks/<name>.py (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"kdkit_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def claims():
    return _script("claims")


def _diff(mean: float, half: float, n: int = 10) -> dict:
    return {"n": n, "mean": mean, "half_width": half, "sd": 0.0, "level": 0.95}


@pytest.mark.parametrize("mean,half,direction,threshold,verdict", [
    (0.010, 0.004, "higher", 0.0, "supported"),        # [0.006, 0.014] above 0
    (-0.010, 0.004, "higher", 0.0, "not supported"),   # [-0.014, -0.006] below 0
    (0.002, 0.004, "higher", 0.0, "cannot tell"),      # holds 0
    (-0.010, 0.004, "lower", 0.0, "supported"),        # a claimed decrease
    (-0.003, 0.001, "higher", -0.005, "supported"),    # within 0.5 points: [-0.004, -0.002] above -0.005
    (-0.008, 0.001, "higher", -0.005, "not supported"),
])
def test_verdict_is_read_off_the_interval(claims, mean, half, direction, threshold, verdict):
    cl = claims.Claim("p", "t", "s", "c", "a", "b", threshold=threshold, direction=direction)
    assert claims._verdict(_diff(mean, half), cl) == verdict


def test_one_seed_cannot_tell(claims):
    cl = claims.Claim("p", "t", "s", "c", "a", "b")
    assert claims._verdict(_diff(0.5, float("nan"), n=1), cl) == "cannot tell"


def test_table_reads_compare_reports(claims, tmp_path):
    report = {"cells": {"data=mnist": {"arms": {}, "pairs": [
        {"arm": "kd", "against": "alone", "diff": _diff(0.0105, 0.0021)},
        {"arm": "th_kd", "against": "alone84", "diff": _diff(float("nan"), float("nan"), n=0)}]}}}
    (tmp_path / "lowlabel-lenet").mkdir()
    (tmp_path / "lowlabel-lenet" / "compare.json").write_text(json.dumps(report))
    rows = claims.evaluate(tmp_path)
    kd = next(r for r in rows if r["spec"] == "lowlabel-lenet" and r["cell"] == "data=mnist"
              and r["arm"] == "kd" and r["against"] == "alone")
    assert kd["verdict"] == "supported"
    th = next(r for r in rows if r["spec"] == "lowlabel-lenet" and r["cell"] == "data=mnist"
              and r["arm"] == "th_kd" and r["against"] == "alone84")
    assert th["verdict"] == "not measured yet" and th["diff"] is None  # a pair no seed has reached yet
    assert all(r["verdict"] == "not measured yet" for r in rows if r["spec"] != "lowlabel-lenet")
    table = claims.markdown(rows)
    assert "+1.05 [+0.84, +1.26]" in table
    assert "`kdkit compare benchmarks/compare/lowlabel_lenet.yaml`" in table  # the spec file, found by its name


def test_marked_block_replaces_only_its_own_block(tmp_path):
    mod = _script("marked_block")
    doc = tmp_path / "B.md"
    a_block = "before\n<!-- a:begin -->\nold a\n<!-- a:end -->\nmid\n"
    doc.write_text(a_block + "<!-- b:begin -->\nold b\n<!-- b:end -->\n")
    mod.write_block(doc, "b", "new b")
    assert doc.read_text() == a_block + "<!-- b:begin -->\nnew b\n<!-- b:end -->\n"
    with pytest.raises(SystemExit, match="c:begin"):
        mod.write_block(doc, "c", "x")  # no such block: one clear error, file untouched
    doc.write_text("<!-- a:end -->\n<!-- a:begin -->\n")
    with pytest.raises(SystemExit, match="followed by"):
        mod.write_block(doc, "a", "x")


def test_per_seed_table_lists_each_arms_seeds_in_order(tmp_path):
    mod = _script("per_seed")
    report = {"metric": "val_accuracy", "seeds": [100, 101], "cells": {
        "data=a": {"arms": {"alone": {"per_seed": {"101": 0.5, "100": 0.25}}}},
        "data=b": {"arms": {"kd": {"per_seed": {"100": 0.125}}}}}}
    lines = mod.table(report).splitlines()
    assert lines[0] == "val_accuracy (%), seeds 100, 101 in order"
    assert "| alone | 25.0 / 50.0 | not run yet |" in lines
    assert "| kd | not run yet | 12.5 |" in lines
    assert "| alone | 25.00 / 50.00 | not run yet |" in mod.table(report, decimals=2).splitlines()
