"""Faults during a run: non-finite steps, failed checkpoint writes, corrupt checkpoints, SIGKILL and SIGTERM,
and reruns that must repeat exactly. RELIABILITY.md lists what each test guarantees."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdkit
from kdkit.config import load_config
from kdkit.errors import TrainingError
from kdkit.methods import METHODS, Method, Stage, Update, register
from kdkit.run import execute

from .conftest import ROOT, digits_overrides


@dataclass
class _NoOptions:
    pass


class _Faulty(Method):
    """Cross-entropy whose loss (or only its gradient) turns non-finite at chosen calls of the loss."""

    name = "_faulty"
    Options = _NoOptions
    needs_teacher = False
    frozen_prefixes = ()
    bad_calls: set[int] = set()
    kind = "loss"
    calls = 0

    def _loss(self, batch):
        _Faulty.calls += 1
        out = F.cross_entropy(self.student(batch.x), batch.y)
        if _Faulty.calls not in _Faulty.bad_calls:
            return {"ce": out}
        if _Faulty.kind == "loss":
            return {"ce": out * float("nan")}
        # a finite loss with an infinite gradient: d sqrt(z)/dz at z = 0 is inf, times 0 gives nan
        p = next(self.student.parameters())
        return {"ce": out + 0.0 * torch.sqrt((p - p.detach()).sum())}

    def stages(self):
        return [Stage("train", [Update("s", list(self.student.parameters()), self._loss)], 3, [self.student])]


@pytest.fixture
def faulty():
    register(_Faulty)
    _Faulty.calls, _Faulty.bad_calls, _Faulty.kind = 0, set(), "loss"
    yield _Faulty
    METHODS.pop(_Faulty.name)


def _faulty_cfg(out: Path, **extra: object):
    return load_config(None, digits_overrides(out, **{"model.arch": "mlp", "method.name": "_faulty",
                                                       "train.epochs": 3, "train.schedule": "constant", **extra}))


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_non_finite_step_restores_the_last_checkpoint_and_lowers_the_learning_rate(tmp_path, faulty, kind):
    faulty.kind = "loss" if kind == "loss" else "grad"
    faulty.bad_calls = {25}  # epoch 2 step 5 (digits here: 20 steps of 64 per epoch)
    with pytest.warns(UserWarning, match=f"non-finite {kind}.*restored the checkpoint at stage 1 epoch 2 step 0"):
        res = execute(_faulty_cfg(tmp_path / "r"), "train")
    (fault,) = res.summary["faults"]
    assert fault["kind"] == f"non-finite {kind}" and fault["epoch"] == 2 and fault["step"] == 5
    assert fault["terms"] == (["ce"] if kind == "loss" else [])
    assert "learning rate x 0.1" in fault["action"]
    events = _events(res.run_dir)
    assert [e["event"] for e in events].count("fault") == 1
    # epoch 1 at the configured rate; the repeated epoch 2 and epoch 3 at a tenth of it
    assert [e["lr"] for e in events if e["event"] == "epoch"] == pytest.approx([0.003, 0.0003, 0.0003])
    assert all(torch.isfinite(v).all() for v in kdkit.load(res.run_dir / "model.pt").state_dict().values())
    assert json.loads((res.run_dir / "summary.json").read_text())["faults"] == res.summary["faults"]


def test_a_second_fault_gives_up_and_keeps_the_checkpoint(tmp_path, faulty):
    faulty.bad_calls = set(range(25, 1000))
    with pytest.raises(TrainingError, match=r"non-finite loss \(ce\) .*happened again after restoring.*kept"), \
            pytest.warns(UserWarning, match="restored the checkpoint"):
        execute(_faulty_cfg(tmp_path / "r"), "train")
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["position"] == {"stage": 0, "epoch": 1, "step": 0}  # the last good one, before both faults
    assert [e["kind"] for e in _events(tmp_path / "r") if e["event"] == "fault"] == ["non-finite loss"]
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_on_nonfinite_stop_stops_at_once(tmp_path, faulty):
    faulty.bad_calls = {25}
    with pytest.raises(TrainingError, match=r"non-finite loss \(ce\) in stage 'train' epoch 2 step 5 .*recover"):
        execute(_faulty_cfg(tmp_path / "r", **{"train.on_nonfinite": "stop"}), "train")
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["position"] == {"stage": 0, "epoch": 1, "step": 0}


def test_a_fault_in_the_first_epoch_restores_the_initial_state(tmp_path, faulty):
    faulty.bad_calls = {4}
    with pytest.warns(UserWarning, match="restored the checkpoint at stage 1 epoch 1 step 0"):
        res = execute(_faulty_cfg(tmp_path / "r"), "train")
    assert len(res.summary["faults"]) == 1


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_training_goes_on(tmp_path, faulty, monkeypatch):
    real = torch.save
    calls = {"n": 0}
    seen = {}

    def full_disk(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the checkpoint after epoch 2: half written, then the disk is full
            f.write(b"PK\x03\x04 partial")
            raise OSError(28, "No space left on device")
        if calls["n"] == 4:  # the next write: what is on disk now is what a crash would have left
            seen["position"] = _position(tmp_path / "r")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.warns(UserWarning, match="could not write the checkpoint .*No space left.*previous one is kept"):
        res = execute(_faulty_cfg(tmp_path / "r"), "train")
    assert seen["position"] == {"stage": 0, "epoch": 1, "step": 0}  # epoch 1's checkpoint, intact
    fault = next(f for f in res.summary["faults"] if f["kind"] == "checkpoint write failed")
    assert "No space left on device" in fault["error"]
    assert not list(res.run_dir.glob(".*tmp*"))  # the half-written temporary file is gone
    assert (res.run_dir / "model.pt").is_file()


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, faulty, monkeypatch):
    from .conftest import crash_at

    cfg = _faulty_cfg(tmp_path / "r", **{"train.deterministic": True})
    ref = execute(_faulty_cfg(tmp_path / "ref", **{"train.deterministic": True}), "train")
    crash_at(cfg, 50, monkeypatch, command="train")  # in epoch 3: checkpoints after epochs 1 and 2 exist
    ckpt = tmp_path / "r" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as by a crash of the machine
    with pytest.warns(UserWarning, match=r"checkpoint.pt' is corrupt.*resuming from the previous checkpoint"):
        res = execute(cfg, "train", resume=True)
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ killed processes

def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdkit", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _position(run_dir: Path) -> dict | None:
    try:
        return torch.load(run_dir / "checkpoint.pt", weights_only=True)["position"]
    except Exception:  # not written yet, or being renamed into place
        return None


def _kill_when(p: subprocess.Popen, run_dir: Path, ready, sig: int = signal.SIGKILL) -> tuple[dict, str]:
    """Send `sig` to `p` once its checkpoint's position satisfies `ready`; the position and p's stderr."""
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        pos = _position(run_dir)
        if pos is not None and ready(pos):
            p.send_signal(sig)
            return pos, p.communicate(timeout=60)[1]
        time.sleep(0.02)
    _, err = p.communicate(timeout=60)
    raise AssertionError(f"the run ended before the kill point (exit {p.returncode}): {err[-2000:]}")


def _distill_args(out: Path, teacher: Path, **extra: object) -> list[str]:
    o = {"teacher.checkpoint": str(teacher), "student.arch": "mlp", "student.hidden": "[32]",
         "train.deterministic": True, "train.threads": 1, "train.checkpoint_every": 2, **extra}
    return ["distill", *digits_overrides(out, **o)]


def _same_weights(a: Path, b: Path) -> None:
    x, y = kdkit.load(a).state_dict(), kdkit.load(b).state_dict()
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _inside_epoch_2(pos: dict) -> bool:
    return pos["epoch"] >= 1 and pos["step"] > 0


def _inside_stage_2(pos: dict) -> bool:
    return pos["stage"] == 1 and (pos["epoch"], pos["step"]) != (0, 0)


#: KD killed inside its second epoch; RDSKD's two stages (generator, then student) killed inside the second
KILLS = {
    "mid-epoch": ({"train.epochs": 4}, _inside_epoch_2),
    "mid-multi-stage": ({"method.name": "rdskd", "method.generator_epochs": 2, "train.epochs": 3,
                         "method.steps_per_epoch": 8, "data.val_split": 0, "train.select": "last",
                         "train.batch_size": 32, "method.diagnostics_samples": 64, "method.grid_images": 16,
                         "method.generator_width": 16, "method.latent_dim": 16}, _inside_stage_2),
}


@pytest.mark.parametrize("what", list(KILLS))
def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path, teacher_file, what):
    extra, ready = KILLS[what]
    ref = _cli(*_distill_args(tmp_path / "ref", teacher_file, **extra))
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    run = tmp_path / "killed"
    pos, _ = _kill_when(_cli(*_distill_args(run, teacher_file, **extra)), run, ready)
    assert not (run / "model.pt").exists(), f"killed too late, at {pos}"
    resumed = _cli("distill", "--resume", str(run))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _same_weights(tmp_path / "ref" / "model.pt", run / "model.pt")
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    got = json.loads((run / "summary.json").read_text())
    assert got["test_accuracy"] == ref_summary["test_accuracy"] and got["test_loss"] == ref_summary["test_loss"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_save_a_checkpoint_and_exit_cleanly(tmp_path, teacher_file, sig):
    run = tmp_path / "run"
    p = _cli(*_distill_args(run, teacher_file, **{"train.epochs": 30, "train.checkpoint_every": 0}))
    _, err = _kill_when(p, run, lambda pos: pos["epoch"] >= 1, sig)
    assert p.returncode == 130
    assert "checkpoint saved; continue with --resume" in err and "Traceback" not in err
    pos = _position(run)
    assert pos is not None and pos["epoch"] >= 1 and not (run / "model.pt").exists()


# ------------------------------------------------------------------------------ reruns

def test_same_config_and_seed_give_the_same_summary(tmp_path, teacher_file):
    def figures(out: Path) -> dict:
        o = {"teacher.checkpoint": str(teacher_file), "student.arch": "mlp", "student.hidden": "[32]",
             "train.deterministic": True, "seed": 3}
        s = execute(load_config(None, digits_overrides(out, **o)), "distill").summary
        for card in [s["report_card"], *s["report_card"].values()]:  # timings of this machine, not results
            if isinstance(card, dict):
                for k in [k for k in card if "latency" in k or k.startswith("speedup")]:
                    card.pop(k)
        return {k: v for k, v in s.items() if k not in ("wall_time_s", "process_wall_time_s", "train_time_s",
                                                      "cpu_steal", "run_dir")}

    a, b = figures(tmp_path / "a"), figures(tmp_path / "b")
    assert a == b
    assert a["seed"] == 3 and a["world_size"] == 1 and a["global_batch_size"] == 64
    assert a["python"] == ".".join(map(str, sys.version_info[:3])) and a["torch"] == torch.__version__
    assert a["kdkit"] == kdkit.__version__
