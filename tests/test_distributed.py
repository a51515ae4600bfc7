"""torchrun with 2 CPU processes (gloo) against 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import kdkit

from .conftest import ROOT, digits_overrides


def _launch(out, nproc: int, args: list[str]) -> None:
    """Run `kdkit train ARGS` in `nproc` processes (torchrun when nproc > 1); on failure, show every rank's own
    output (torchrun keeps it per rank under a log dir) and whether the run got as far as its summary."""
    # faulthandler: a rank that aborts (SIGABRT from C++) still prints the Python stack of every thread
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    logs = out.parent / f"{out.name}-logs"
    if nproc == 1:
        cmd = [sys.executable, "-m", "kdkit", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--log-dir", str(logs), "--redirects", "3", "-m", "kdkit", "train", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if p.returncode != 0:
        ranks = sorted(logs.rglob("std*.log"))
        shown = "\n".join(f"--- {f.relative_to(out.parent)}:\n{f.read_text(errors='replace')[-1500:]}" for f in ranks)
        pytest.fail(f"exit {p.returncode}; summary.json written: {(out / 'summary.json').exists()}\n"
                    f"{shown}\n--- launcher:\n{p.stderr[-1500:]}")


def _run(out, nproc: int) -> dict:
    _launch(out, nproc, digits_overrides(out, **{"model.arch": "mlp", "train.epochs": 4, "train.batch_size": 64}))
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    one = _run(tmp_path / "one", 1)
    two = _run(tmp_path / "two", 2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["global_batch_size"] == one["global_batch_size"] == 64
    assert one["python"] == platform.python_version() and one["torch"] == torch.__version__ and one["seed"] == 0
    assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 0.003
    assert abs(two["val_accuracy"] - one["val_accuracy"]) <= 0.003
    # gradients averaged over two halves of each global batch equal the full-batch gradient: same weights
    a = kdkit.load(tmp_path / "one" / "model.pt").state_dict()
    b = kdkit.load(tmp_path / "two" / "model.pt").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # only rank 0 wrote: a single set of run files, one line per epoch
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert sum(x["event"] == "epoch" for x in lines) == 4


@pytest.mark.slow
def test_a_fault_on_one_process_is_recovered_by_all(tmp_path):
    """NaN on rank 1 only: both processes restore the last checkpoint together and finish (no hang)."""
    out = tmp_path / "fault"
    _launch(out, 2, digits_overrides(out, **{"model.arch": "null", "model.module": "tests.user_models:NaNOnRank1",
                                             "train.epochs": 3, "train.batch_size": 64}))
    summary = json.loads((out / "summary.json").read_text())
    (fault,) = summary["faults"]
    assert fault["kind"] == "non-finite gradient" and "learning rate x 0.1" in fault["action"]
