"""The one training loop.

For every stage a method declares, the engine: sets ``requires_grad`` on exactly the stage's
parameters, builds one optimizer and schedule per update, wraps the step in DDP under torchrun, and
runs epochs of batches (or of generated steps for data-free stages). Each step runs every update
(``repeat`` times): forward under optional autocast, a finiteness check, backward, optional gradient
clipping, optimizer and schedule step. After each epoch it evaluates on the validation split, keeps the
best state (validation accuracy only: the test split is never looked at during training), logs to
``metrics.jsonl`` and writes an atomic checkpoint that holds everything needed to continue: models,
extra modules, optimizers, schedules, RNG states, the stage, epoch and step.

Faults: a non-finite loss or gradient stops the step before the optimizer moves. With
``train.on_nonfinite=recover`` (the default) the engine restores the last good checkpoint (one is written
before the first step), multiplies every learning rate by ``train.recover_lr_factor`` and continues; a
second fault stops the run. A checkpoint that cannot be written (a full disk) leaves the previous one in
place and training goes on with a warning. Both are logged in ``metrics.jsonl`` and listed in
:attr:`Engine.faults` (``summary.json``: ``faults``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Config, TrainConfig
from ..data import BatchLoader, DataBundle, make_loader
from ..errors import TrainingError, warn
from ..methods.base import Method, Stage, Update
from ..stop_signals import on_stop_signals
from ..teacher_cache import TeacherCache
from .checkpoint import atomic_save, load_latest
from .distributed import DistInfo
from .evaluate import evaluate
from .metrics import Meter, MetricsLog, Progress, duration, fmt
from .optim import Optimizers, Schedules, build_optimizer, update_config

FORMAT = "kdkit-train-state"


def apply_speed_options(train: TrainConfig, modules: list[nn.Module], compiled: list[nn.Module | None]) -> None:
    """``train.channels_last`` on `modules` and ``train.compile`` on the `compiled` models, in place (their
    state_dict keys do not change)."""
    if train.channels_last:
        for m in modules:
            m.to(memory_format=torch.channels_last)
    if train.compile:
        for m in compiled:
            if m is not None:
                m.compile()


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _numpy_state() -> tuple[torch.Tensor, int, int, float]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Stepper(nn.Module):
    """Routes DDP's forward to an update's loss function, so DDP sees every forward and backward."""

    def __init__(self, method: Method, updates: list[Update]):
        super().__init__()
        self.method = method
        self.updates = updates

    def forward(self, i: int, batch: Any) -> dict[str, torch.Tensor]:
        return self.updates[i].loss(batch)


@dataclass
class _Position:
    stage: int = 0
    epoch: int = 0
    step: int = 0


@dataclass
class _StageState:
    optimizers: list[Optimizers]
    schedules: list[Schedules]
    meter: Meter = field(default_factory=Meter)
    best_acc: float = -1.0
    best_loss: float = float("inf")  # the tie-break between epochs of equal validation accuracy
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    last_val: dict[str, float] = field(default_factory=dict)
    steps_done: int = 0  # optimizer steps of the stage's first update so far (its repeats included)
    #: per update, the running mean of its (clipped) gradient norms for train.grad_clip_relative: [sum, weight]
    norm_history: list[list[float]] = field(default_factory=list)
    started_min: float = 0.0  # minutes of training when the stage began (its share of a time budget starts here)


class Interrupted(Exception):
    """Raised after a checkpoint was saved on SIGINT/SIGTERM."""


class NonFiniteStep(TrainingError):
    """A step's loss or gradient is not finite; `record` describes where (for the fault log)."""

    def __init__(self, message: str, record: dict[str, Any]):
        super().__init__(message)
        self.record = record


class Engine:
    def __init__(self, method: Method, data: DataBundle, cfg: Config, *, run_dir: Path | None, dist: DistInfo,
                 device: torch.device, process_start: float | None = None):
        self.method = method
        #: the task's metric that validation selects on (accuracy, miou...)
        self.primary = method.task.primary
        self.data = data
        self.cfg = cfg
        self.train_cfg = cfg.train
        self.run_dir = run_dir
        self.dist = dist
        self.device = device
        main = dist.is_main and run_dir is not None
        self.metrics = MetricsLog(run_dir / "metrics.jsonl" if main else None, cfg.logging.tensorboard)
        self.ckpt_path = run_dir / "checkpoint.pt" if main else None
        self.ckpt_written = 0.0  # time.time() of the last checkpoint written (train.checkpoint_min)
        self.progress = Progress(cfg.train.progress, dist.is_main)
        self.autocast = autocast_for(device, cfg.train.amp)
        self.scaler = torch.amp.GradScaler("cuda") if (cfg.train.amp and device.type == "cuda") else None
        self._loaders: dict[tuple[str, bool, int | None, bool], Any] = {}
        self._released_skips: list[str] = []  # files skipped by loaders since released
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0
        #: wall time of the run's earlier processes (restored on --resume), and when this process started
        #: (`process_start`, given when the caller's set-up should count; default: now): :meth:`wall_s`
        self.wall_before = 0.0
        self.process_start = time.time() if process_start is None else process_start
        self.global_step = 0
        self._stop_signal: int | None = None
        #: (minutes of training, state_dict of the evaluated model) taken at train.snapshot_min
        self.snapshots: list[tuple[float, dict[str, torch.Tensor]]] = []
        #: why and where training ended early, else None: {"by": "time_budget" | the method's reason,
        #: "stage", "epoch", "step" (1-based), "steps_per_epoch"}; later stages are then skipped
        self.stopped: dict[str, Any] | None = None
        #: the last state of the final stage, evaluated when model selection kept another epoch (else None):
        #: {"stage", "epoch", "step", "val_accuracy", "test_accuracy"}; read by the run summary (best vs last)
        self.last_model_eval: dict[str, Any] | None = None
        #: the faults met so far (non-finite steps recovered from, failed checkpoint writes)
        self.faults: list[dict[str, Any]] = []

    # ---- data -------------------------------------------------------------------------------
    def loader(self, split: str, train: bool, batch_size: int | None = None, drop_last: bool = True) -> Any:
        key = (split, train, batch_size, drop_last)
        if key not in self._loaders:
            c = self.cfg
            bs = batch_size or (c.train.batch_size if train else c.train.eval_batch_size)
            self._loaders[key] = make_loader(
                self.data.split(split), bs, c.data, train=train, info=self.data.info, seed=c.seed, device=self.device,
                rank=self.dist.rank, world=self.dist.world, channels_last=c.train.channels_last, drop_last=drop_last)
        return self._loaders[key]

    def _skips(self) -> list[str]:
        """Files left out by the loaders held now and by those released."""
        return self._released_skips + [n for ld in self._loaders.values() for n in getattr(ld, "skipped", [])]

    def release_loaders(self) -> None:
        """Drop the training loaders (their persistent workers stop) once training is over, so that the final
        evaluations' workers do not run beside idle ones; what they skipped is kept for the summary."""
        self._released_skips = self._skips()
        self._loaders.clear()

    def skipped_files(self) -> dict[str, Any]:
        """Unreadable files left out of their batches (data.on_bad_file: skip): count and the first few."""
        names = self._skips()
        return {"count": len(names), "first": sorted(set(names))[:10]}

    # ---- checkpoints ------------------------------------------------------------------------
    def _save(self, pos: _Position, st: _StageState | None, t0: float) -> None:
        if self.ckpt_path is None:
            return
        state = {
            "format": FORMAT, "version": 1, "config": self.cfg.to_dict(),
            "position": {"stage": pos.stage, "epoch": pos.epoch, "step": pos.step},
            "global_step": self.global_step,
            "method": self.method.checkpoint_state(), "method_run_state": self.method.run_state(),
            "rng": rng_state(),
            "metrics_lines": self.metrics.lines(),
            "elapsed": self.elapsed_before + time.time() - t0,
            "wall": self.wall_s(),
            "history": self.history,
            "snapshots": self.snapshots, "stopped": self.stopped,
            "last_model_eval": self.last_model_eval,
            "faults": self.faults,
        }
        if st is not None:
            state["stage_state"] = {
                "optimizers": [o.state_dict() for o in st.optimizers],
                "schedules": [s.state_dict() for s in st.schedules],
                "meter": st.meter.state_dict(),
                "best_acc": st.best_acc, "best_loss": st.best_loss, "best_epoch": st.best_epoch,
                "best_state": st.best_state,
                "last_val": st.last_val, "steps_done": st.steps_done, "norm_history": st.norm_history,
                "started_min": st.started_min,
            }
            if self.scaler is not None:
                state["stage_state"]["scaler"] = self.scaler.state_dict()
        try:
            atomic_save(state, self.ckpt_path, keep_previous=True)
            self.ckpt_written = time.time()
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as either
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            fault = {"kind": "checkpoint write failed", "error": first, "global_step": self.global_step,
                     "action": "kept the previous checkpoint; training continues"}
            self.faults.append(fault)
            self.metrics.write(event="fault", **fault)
            warn(f"could not write the checkpoint {self.ckpt_path} ({first}); the previous one is kept and "
                 "training continues: free disk space so the next checkpoint succeeds")

    def _restore(self, state: dict[str, Any]) -> _Position:
        self.method.load_checkpoint_state(state["method"])
        self.method.load_run_state(state.get("method_run_state", {}))
        set_rng_state(state["rng"])
        self.metrics.truncate(state["metrics_lines"])
        self.history = list(state.get("history", []))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.global_step = int(state.get("global_step", 0))
        self.snapshots = list(state.get("snapshots", []))
        self.stopped = state.get("stopped") or (
            {"by": "time_budget", "stage": None} if state.get("out_of_time") else None)  # kdkit 0.1 checkpoints
        self.last_model_eval = state.get("last_model_eval")
        self.faults = list(state.get("faults", []))
        p = state["position"]
        return _Position(p["stage"], p["epoch"], p["step"])

    # ---- signals ----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        """Whether a signal asked to stop; under torchrun all ranks agree, so they stop at the same step."""
        return not self._all_ranks(self._stop_signal is None)

    # ---- the loop ---------------------------------------------------------------------------
    def _planned_steps(self, stages: list[Stage]) -> int:
        """Optimizer steps of the whole run as planned (every stage's epochs x steps per epoch)."""
        total = 0
        for stage in stages:
            if stage.data is not None:
                steps = len(self.loader(stage.data, train=True, batch_size=stage.batch_size,
                                        drop_last=stage.drop_last))
            else:
                steps = int(stage.steps_per_epoch or 0)
            total += stage.epochs * steps
        return total

    def _run_clock(self, planned: int, t0: float, start_step: int) -> Any:
        """The progress lines' clock: time spent, and the whole run's time left at this session's pace (capped
        by the time budget)."""
        c = self.train_cfg

        def clock() -> str:
            spent = self.elapsed_before + time.time() - t0
            done = self.global_step - start_step
            left = "?" if done <= 0 else duration((time.time() - t0) / done * max(0, planned - self.global_step))
            if c.time_budget_min is not None and done > 0:
                budget_left = max(0.0, 60 * c.time_budget_min - spent)
                left = duration(min(budget_left, (time.time() - t0) / done * max(0, planned - self.global_step)))
            return f"elapsed {duration(spent)}, run ~{left} left"

        return clock

    def wall_s(self) -> float:
        """Seconds of wall time the run has taken so far, over every process that worked on it (a resumed run
        counts its earlier processes up to their last checkpoint; older checkpoints without this record count
        their training time instead)."""
        return self.wall_before + time.time() - self.process_start

    def fit(self, resume: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        stages = self.method.stages()
        pos = self._restore(resume) if resume is not None else _Position()
        if resume is not None:  # only here: a recovery from a fault within this process keeps its own clock
            self.wall_before = float(resume.get("wall", resume.get("elapsed", 0.0)))
        t0 = time.time()
        self.progress.clock = self._run_clock(self._planned_steps(stages), t0, self.global_step)
        if resume is None:
            self._save(pos, None, t0)  # the first "last good" checkpoint, for recovery from a fault
        with on_stop_signals(self._on_signal):
            while True:
                try:
                    self._run_stages(stages, pos, resume, t0)
                    break
                except NonFiniteStep as fault:
                    resume = self._recover(fault, t0)
                    t0 = time.time()
                    pos = _Position(**resume["position"])
        self.elapsed = self.elapsed_before + time.time() - t0
        return self.history

    def _run_stages(self, stages: list[Stage], pos: _Position, resume: dict[str, Any] | None, t0: float) -> None:
        for si in range(pos.stage, len(stages)):
            if self.stopped:
                why = ("train.time_budget_min reached" if self.out_of_time else
                       f"training stopped early ({self.stopped['by']})")
                self.history.append({"stage": stages[si].name, "skipped": why})
                self.progress.say(f"[{stages[si].name}] skipped: {why}")
                continue
            start = pos if si == pos.stage else _Position(si)
            stage_resume = resume.get("stage_state") if (resume is not None and si == pos.stage) else None
            self._run_stage(si, stages[si], len(stages), start, stage_resume, t0, final=si == len(stages) - 1,
                            budget_share=self._budget_share(stages[si:]))
            self._save(_Position(si + 1), None, t0)

    def _recover(self, fault: NonFiniteStep, t0: float) -> dict[str, Any]:
        """Restore the last good checkpoint and lower the learning rate, once; then give up.

        Returns the restored state (the caller continues from its position)."""
        c = self.train_cfg
        where = self.run_dir / "checkpoint.pt" if self.run_dir is not None else None
        recovered = self._recovered()
        state = load_latest(where) if (where is not None and c.on_nonfinite == "recover" and
                                       not recovered) else None
        if state is None:
            self.progress.close()
            if c.on_nonfinite == "stop":
                hint = "set train.on_nonfinite=recover to restore and continue with a lower learning rate"
            elif recovered:
                hint = (f"it happened again after restoring the last good checkpoint with the learning rate x "
                        f"{c.recover_lr_factor}")
            else:
                hint = "no checkpoint to restore"
            raise TrainingError(f"{fault} ({hint}); the last good checkpoint is kept: lower train.lr or set "
                                "train.grad_clip, then resume with --resume") from None
        elapsed = self.elapsed_before + time.time() - t0  # time spent on the lost steps still counts
        self._restore(state)
        self.elapsed_before = elapsed
        p = state["position"]
        record = {**fault.record, "action": f"restored the checkpoint at stage {p['stage'] + 1} epoch "
                  f"{p['epoch'] + 1} step {p['step']}; learning rate x {c.recover_lr_factor}"}
        self.faults.append(record)
        self.metrics.write(event="fault", **record)
        self.progress.close()
        self.progress.say(f"warning: {fault}; {record['action']}")
        warn(f"{self.run_dir or 'this run'}: {fault}; {record['action']}")
        return state

    def _recovered(self) -> bool:
        return any(f["kind"].startswith("non-finite") for f in self.faults)

    @property
    def lr_scale(self) -> float:
        """The learning-rate multiplier: train.recover_lr_factor once a non-finite step was recovered from."""
        return self.train_cfg.recover_lr_factor if self._recovered() else 1.0

    def _set_trainable(self, stage: Stage) -> None:
        trainable = {id(p) for p in stage.trainable()}
        for p in self.method.parameters():
            p.requires_grad_(id(p) in trainable)
        self.method.eval()
        for m in stage.train_modules:
            m.train()

    def _run_stage(self, si: int, stage: Stage, n_stages: int, start: _Position, resume: dict[str, Any] | None,
                   t0: float, final: bool = True, budget_share: float = 1.0) -> None:
        tag = stage.name if n_stages == 1 else f"{stage.name} {si + 1}/{n_stages}"
        loader = (self.loader(stage.data, train=True, batch_size=stage.batch_size, drop_last=stage.drop_last)
                  if stage.data is not None else None)
        if loader is not None and len(loader) == 0:
            raise TrainingError(f"stage {stage.name!r}: the {stage.data} split is empty")
        steps = len(loader) if loader is not None else int(stage.steps_per_epoch or 0)
        if steps <= 0:
            raise TrainingError(f"stage {stage.name!r} reads no data and declares no steps_per_epoch")
        self._set_trainable(stage)
        st = self._stage_state(stage, steps, resume)
        self._schedule_to_budget(st, t0, budget_share, resume)
        self.method.forget_optimizer_state = lambda params: _forget([m for o in st.optimizers for m in o.members],
                                                                    params)
        stepper = self._stepper(stage)
        if stage.on_start is not None and start.epoch == 0 and start.step == 0:
            stage.on_start()
        cache = self._teacher_cache(stage, loader)
        try:
            for epoch in range(start.epoch, stage.epochs):
                if self.stopped:
                    break
                self._run_epoch(si, stage, st, stepper, loader, steps, epoch, start, tag, t0)
        finally:
            if cache is not None:
                self.method.set_teacher_cache(None)
                cache.close()
        facts = {"batch_size": loader.batch_size if loader is not None else stage.batch_size,
                 "steps_per_epoch": steps, "data_order": _order_fingerprint(loader, si)}
        self._end_stage(stage, st, tag, cache, facts, final=final or self.stopped is not None)

    def _run_epoch(self, si: int, stage: Stage, st: _StageState, stepper: nn.Module, loader: BatchLoader | None,
                   steps: int, epoch: int, start: _Position, tag: str, t0: float) -> None:
        first_step = start.step if epoch == start.epoch else 0
        if first_step == 0:
            st.meter = Meter()
        epoch_t = time.time()
        undo = self._epoch_start(st) if first_step == 0 and self.method.may_discard_epoch() else None
        desc = f"[{tag}] epoch {epoch + 1}/{stage.epochs}"
        self._train_epoch(si, stage, st, stepper, loader, steps, epoch, first_step, desc, t0)
        record: dict[str, Any] = {f"train/{k}": v for k, v in st.meter.means().items()}
        record["lr"] = st.schedules[0].lr
        record.update(self._validate(stage, st, epoch))
        if stage.on_epoch_end is not None:
            record.update(stage.on_epoch_end(epoch) or {})
        if self.method.stop_request and not self.stopped:
            self.stopped = {"by": self.method.stop_request, "stage": stage.name, "epoch": epoch + 1, "step": steps,
                            "steps_per_epoch": steps}
            self.progress.say(f"[{tag}] training stops after epoch {epoch + 1}: {self.method.stop_request}")
            if self.method.stop_discards_epoch:
                record["discarded"] = self._discard_epoch(st, undo, epoch, tag)
        record["epoch_time_s"] = round(time.time() - epoch_t, 3)
        self.metrics.write(event="epoch", stage=stage.name, epoch=epoch + 1, global_step=self.global_step, **record)
        shown = {k.replace("train/", ""): v for k, v in record.items() if k != "epoch_time_s"}
        self.progress.end_epoch(f"{desc}  {fmt(shown)}  ({record['epoch_time_s']:.1f}s)")
        every_min = self.train_cfg.checkpoint_min
        if (not every_min or epoch + 1 == stage.epochs or self.stopped
                or time.time() - self.ckpt_written >= every_min * 60):
            self._save(_Position(si, epoch + 1, 0), st, t0)

    def _epoch_start(self, st: _StageState) -> dict[str, Any]:
        """What :meth:`_discard_epoch` puts back: the trainable state and what validation knew before the epoch."""
        return {"state": self._state_copy(),
                "val": (st.last_val, st.best_acc, st.best_loss, st.best_epoch, st.best_state)}

    def _state_copy(self) -> dict[str, torch.Tensor]:
        """A copy of the method's trainable state (what a checkpoint holds), to put back later."""
        return {k: v.detach().clone() for k, v in self.method.checkpoint_state().items()}

    def _discard_epoch(self, st: _StageState, undo: dict[str, Any] | None, epoch: int, tag: str) -> bool:
        """Undo the epoch that made the method stop: restore the state from before it (the optimizers' state
        is not restored: training ends here). Not possible for an epoch resumed from a mid-epoch checkpoint."""
        assert self.stopped is not None
        if undo is None:
            warn(f"{self.run_dir or 'this run'}: [{tag}] epoch {epoch + 1} is kept although training stopped "
                 f"because of it ({self.stopped['by']}): it was resumed from a checkpoint within it, so the state "
                 f"before it is not known")
            return False
        self.method.load_checkpoint_state(undo["state"])
        st.last_val, st.best_acc, st.best_loss, st.best_epoch, st.best_state = undo["val"]
        self.stopped["kept_epoch"] = epoch
        self.method.on_epoch_discarded()
        before = f"after epoch {epoch}" if epoch else "before training (the stop came in the first epoch)"
        self.progress.say(f"[{tag}] epoch {epoch + 1} is discarded: the model is as it was {before}")
        return True

    def _teacher_cache(self, stage: Stage, loader: BatchLoader | None) -> TeacherCache | None:
        """A teacher cache for this stage when its images repeat exactly and the method takes it.

        Not in deterministic mode: the teacher's float result for an image changes in its last bits with the
        size and make-up of the batch it ran in, so a run resumed with an empty cache would drift from the
        uninterrupted run (whose cached values came from other batches)."""
        c = self.train_cfg
        if not c.teacher_cache or c.deterministic or loader is None or loader.augment is not None or stage.epochs < 2:
            return None
        cache = TeacherCache(len(loader.data), c.teacher_cache_mb, self.run_dir)
        return cache if self.method.set_teacher_cache(cache) else None

    def _stage_state(self, stage: Stage, steps: int, resume: dict[str, Any] | None) -> _StageState:
        """One optimizer and schedule per update, restored from `resume` when continuing the stage."""
        optimizers, schedules = [], []
        for u in stage.updates:
            where = f"update {u.name!r} of stage {stage.name!r}"
            opt = build_optimizer(u.params, update_config(self.train_cfg, u.optimizer, where), where)
            optimizers.append(opt)
            schedules.append(Schedules(opt, stage.epochs * steps * u.repeat, steps * u.repeat))
        st = _StageState(optimizers, schedules, norm_history=[[0.0, 0.0] for _ in stage.updates])
        for sch in schedules:
            sch.scale = self.lr_scale
        if resume is not None:
            for o, s in zip(optimizers, resume["optimizers"]):
                o.load_state_dict(s)
            for sch, s in zip(schedules, resume["schedules"]):
                sch.load_state_dict(s)
            st.meter.load_state_dict(resume["meter"])
            st.best_acc, st.best_epoch = resume["best_acc"], resume["best_epoch"]
            st.best_loss = float(resume.get("best_loss", float("inf")))
            st.best_state, st.last_val = resume["best_state"], resume.get("last_val", {})
            st.steps_done = int(resume.get("steps_done", 0))
            st.norm_history = [list(h) for h in resume.get("norm_history", st.norm_history)]
            if self.scaler is not None and "scaler" in resume:
                self.scaler.load_state_dict(resume["scaler"])
        return st

    def _budget_share(self, stages_left: list[Stage]) -> float:
        """The first of `stages_left`'s share of the time budget left: its planned steps over theirs (1 when the
        schedules do not follow a budget, without building the stages' loaders to count their steps)."""
        c = self.train_cfg
        if c.time_budget_min is None or not c.schedule_to_budget or len(stages_left) == 1:
            return 1.0
        return self._planned_steps(stages_left[:1]) / max(1, self._planned_steps(stages_left))

    def _schedule_to_budget(self, st: _StageState, t0: float, share: float, resume: dict[str, Any] | None) -> None:
        """With train.time_budget_min (and train.schedule_to_budget), the stage's schedules end when its share of
        the budget left at its start is spent (its planned steps over the steps of the stages left), measured
        on the run's clock, earlier sessions of a resumed run included."""
        c = self.train_cfg
        st.started_min = float(resume.get("started_min", 0.0)) if resume is not None else self.minutes(t0)
        if c.time_budget_min is None or not c.schedule_to_budget:
            return
        budget = max(1e-9, (c.time_budget_min - st.started_min) * share)

        def progress() -> float:
            return (self.minutes(t0) - st.started_min) / budget

        for sch in st.schedules:
            for member in sch.members:
                member.time_progress = progress
                member._apply()  # the factor, with the clock in place

    def _stepper(self, stage: Stage) -> nn.Module:
        """The module every update's forward goes through: DDP-wrapped under torchrun."""
        stepper: nn.Module = _Stepper(self.method, stage.updates)
        if self.dist.enabled:
            # DDP warns when a gradient's strides differ from its bucket's only on size-1 dimensions (e.g. a
            # first conv with one input channel): the memory layout is the same, so the warning is noise.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            several = len(stage.updates) > 1 or any(u.repeat > 1 for u in stage.updates)
            stepper = nn.parallel.DistributedDataParallel(stepper, find_unused_parameters=several)
        return stepper

    def _train_epoch(self, si: int, stage: Stage, st: _StageState, stepper: nn.Module, loader: BatchLoader | None,
                     steps: int, epoch: int, first_step: int, desc: str, t0: float) -> None:
        c = self.train_cfg
        if loader is not None:
            loader.set_epoch(si * 1_000_003 + epoch)  # as _order_fingerprint
            batches: Any = loader.iterate(first_step)
        else:
            batches = (None for _ in range(first_step, steps))
        self.progress.start_epoch(desc, steps, first_step)
        for step, batch in enumerate(batches, start=first_step):
            self._step_and_log(stepper, stage, st, batch, (si, epoch, step))
            if self._should_stop():
                self._save(_Position(si, epoch, step + 1), st, t0)
                self.progress.close()
                raise Interrupted(f"stopped by signal {self._stop_signal or 'on another rank'} at stage "
                                  f"{stage.name!r} epoch {epoch + 1} step {step + 1}; checkpoint saved")
            if c.checkpoint_every and (step + 1) % c.checkpoint_every == 0 and step + 1 < steps:
                self._save(_Position(si, epoch, step + 1), st, t0)
            if self._clock(t0):
                self.stopped = {"by": "time_budget", "stage": stage.name, "epoch": epoch + 1, "step": step + 1,
                                "steps_per_epoch": steps}
                self.progress.say(f"[{stage.name}] time budget of {c.time_budget_min} min reached at epoch "
                                  f"{epoch + 1} step {step + 1}")
                break

    def _step_and_log(self, stepper: nn.Module, stage: Stage, st: _StageState, batch: Any,
                      where: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """One step with the per-step bookkeeping of the loop: running means, step log, progress."""
        step = where[2]
        logged = self._step(stepper, stage, st, batch, where)
        st.meter.add(logged)
        self.global_step += 1
        if (step + 1) % self.train_cfg.log_every == 0:
            self.metrics.write(event="step", stage=stage.name, epoch=where[1], step=step + 1,
                               global_step=self.global_step, lr=st.schedules[0].lr,
                               **{f"train/{k}": v for k, v in st.meter.means().items()})
        self.progress.step(st.meter.means() if (step + 1) % 10 == 0 else None)
        return logged

    def step_function(self, stage_index: int = 0,
                      steps_per_epoch: int = 1000) -> Callable[[Any], dict[str, torch.Tensor]]:
        """Training steps of one of the method's stages as a function of a batch, through exactly the code
        :meth:`fit` runs per step (trainable parameters, optimizers, schedules, DDP, autocast, finiteness
        check, running means, logging, progress), without epochs, evaluation or checkpoints; it returns the
        step's logged losses. For timing (``kdkit bench speed``) and tests."""
        stage = self.method.stages()[stage_index]
        self._set_trainable(stage)
        st = self._stage_state(stage, steps_per_epoch, None)
        stepper = self._stepper(stage)
        counter = itertools.count()

        def step(batch: Any) -> dict[str, torch.Tensor]:
            return self._step_and_log(stepper, stage, st, batch, (stage_index, 0, next(counter)))

        return step

    @property
    def out_of_time(self) -> bool:
        """Whether train.time_budget_min ended training."""
        return self.stopped is not None and self.stopped["by"] == "time_budget"

    def minutes(self, t0: float) -> float:
        """Minutes of training so far (earlier sessions of a resumed run included)."""
        return (self.elapsed_before + time.time() - t0) / 60.0

    def _clock(self, t0: float) -> bool:
        """Take the snapshots that are due; True when train.time_budget_min is spent."""
        c = self.train_cfg
        if not c.snapshot_min and c.time_budget_min is None:
            return False
        now = self.minutes(t0)
        while len(self.snapshots) < len(c.snapshot_min) and now >= c.snapshot_min[len(self.snapshots)]:
            state = {k: v.detach().clone() for k, v in self.method.eval_model().state_dict().items()}
            self.snapshots.append((c.snapshot_min[len(self.snapshots)], state))
        return c.time_budget_min is not None and now >= c.time_budget_min

    def _validate(self, stage: Stage, st: _StageState, epoch: int) -> dict[str, float]:
        """Validation accuracy (or the stage's label-free monitor) when due; remembers the best state.

        Only the validation split or the monitor is ever looked at: never the test split."""
        c = self.train_cfg
        due = (epoch + 1) % c.eval_every == 0 or epoch + 1 == stage.epochs
        if not due or (self.data.val is None and stage.monitor is None):
            return {}
        record: dict[str, float] = {}
        if stage.monitor is not None:
            score = float(stage.monitor())
            st.last_val = {self.primary: score, "loss": float("nan")}  # here the primary is the monitor's score
            record["monitor"] = score
        else:
            model = (stage.evaluate or self.method.eval_model)()
            with self.autocast:
                scores = evaluate(model, self.loader("val", train=False), self.dist, self.method.task)
            st.last_val = {self.primary: scores[self.primary], "loss": scores["loss"]}
            record = {f"val/{self.primary}": st.last_val[self.primary]}
            if st.last_val["loss"] == st.last_val["loss"]:  # NaN where the task has no loss on this split
                record["val/loss"] = st.last_val["loss"]
        acc, loss = st.last_val[self.primary], st.last_val.get("loss", float("nan"))
        tie_better = acc == st.best_acc and loss == loss and loss < st.best_loss  # loss == loss: not NaN
        if (stage.select or c.select) == "best_val" and (acc > st.best_acc or tie_better):
            st.best_acc, st.best_loss, st.best_epoch = acc, (loss if loss == loss else float("inf")), epoch
            st.best_state = self._state_copy()
        return record

    def _end_stage(self, stage: Stage, st: _StageState, tag: str, cache: TeacherCache | None,
                   facts: dict[str, Any], final: bool) -> None:
        """Keep the selected state, run the stage's end hook, record the stage as it ran.

        The record says what was used (global batch, steps per epoch, optimizer steps, the learning rate at
        the end of every update), where training stopped (``reached``, and ``stopped_by`` when the time
        budget ended it early) and which epoch was kept. For the run's final stage, when selection kept
        another epoch than the last, the last state is also scored (validation and test) before the kept
        one is restored: the summary reports best against last. Nothing here chooses anything by it."""
        stop = self.stopped if (self.stopped and self.stopped["stage"] == stage.name) else None
        steps = facts["steps_per_epoch"]
        reached = ({"epoch": stop["epoch"], "step": stop["step"]} if stop is not None
                   else {"epoch": stage.epochs, "step": steps})
        result: dict[str, Any] = {
            "stage": stage.name, "epochs": stage.epochs, **facts, "steps": st.steps_done,
            "reached": reached, "completed": (reached["epoch"], reached["step"]) == (stage.epochs, steps),
            "stopped_by": None if stop is None else stop["by"],
            "lr_end": {u.name: sch.lr for u, sch in zip(stage.updates, st.schedules)},
        }
        if cache is not None:
            result["teacher_cache"] = cache.stats()
        key, what = (("monitor", "monitor") if stage.monitor is not None
                     else (f"val_{self.primary}", f"validation {self.primary}"))
        select = stage.select or self.train_cfg.select
        discarded = stop is not None and "kept_epoch" in stop  # the last epoch was undone (_discard_epoch)
        last_epoch = stop["kept_epoch"] if discarded else reached["epoch"]
        if discarded:
            result["discarded_epoch"] = reached["epoch"]
        if select == "best_val" and st.best_state is not None:
            kept_last = st.best_epoch + 1 == last_epoch and (discarded or reached["step"] == steps)
            if final and not kept_last:
                last = {"epoch": last_epoch, "step": steps} if discarded else reached
                self.last_model_eval = self._score_last(stage, st, last)
            elif final:
                self.last_model_eval = None
            self.method.load_checkpoint_state(st.best_state)
            result.update({"selected": "best_val", "selected_epoch": st.best_epoch + 1, key: st.best_acc})
            if not kept_last:
                self.progress.say(f"[{tag}] kept epoch {st.best_epoch + 1} (best {what} {100 * st.best_acc:.2f}%)")
        else:
            if final:
                self.last_model_eval = None
            result.update({"selected": "last", "selected_epoch": last_epoch, key: st.last_val.get(self.primary)})
        if stage.on_end is not None:
            stage.on_end()
        self.history.append(result)
        self.metrics.write(event="stage_end", **result)

    def _score_last(self, stage: Stage, st: _StageState, reached: dict[str, int]) -> dict[str, Any]:
        """Validation and test accuracy of the stage's current (last) state, for the best-vs-last report."""
        model = (stage.evaluate or self.method.eval_model)()
        with self.autocast:
            test = evaluate(model, self.loader("test", train=False), self.dist, self.method.task)
        p = self.primary
        return {"stage": stage.name, **reached, f"val_{p}": st.last_val.get(p), f"test_{p}": test[p]}

    def _all_ranks(self, ok: bool) -> bool:
        """Whether `ok` holds on every process (under torchrun the ranks must agree to stop a step together)."""
        if not self.dist.enabled:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return not bool(flag.item())

    def _fault(self, what: str, losses: dict[str, torch.Tensor], stage: Stage, where: tuple[int, int, int]) -> None:
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
        terms = f" ({', '.join(bad)})" if (what == "loss" and bad) else ""
        record = {"kind": f"non-finite {what}", "terms": bad, "stage": stage.name, "epoch": where[1] + 1,
                  "step": where[2] + 1, "global_step": self.global_step + 1}
        raise NonFiniteStep(f"non-finite {what}{terms} in stage {stage.name!r} epoch {where[1] + 1} step "
                            f"{where[2] + 1}", record)

    def _step(self, stepper: nn.Module, stage: Stage, st: _StageState, batch: Any,
              where: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        c = self.train_cfg
        logged: dict[str, torch.Tensor] = {}
        for i, (u, opt, sch) in enumerate(zip(stage.updates, st.optimizers, st.schedules)):
            for _ in range(u.repeat):
                with self.autocast:
                    losses = stepper(i, batch)
                total = losses["loss"] if "loss" in losses else sum(losses.values())
                if not isinstance(total, torch.Tensor):
                    raise TrainingError(f"update {u.name!r} of stage {stage.name!r} returned no loss")
                finite_loss = bool(torch.isfinite(total.detach()).all())
                if not finite_loss and not self.dist.enabled:  # under DDP every rank must reach backward
                    self._fault("loss", losses, stage, where)
                opt.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(total).backward()
                    opt.unscale_(self.scaler)
                else:
                    total.backward()
                norm = _grad_norm(u.parameters(), c.grad_clip)
                if c.grad_clip_relative is not None and bool(torch.isfinite(norm)):
                    relative_clip(u.parameters(), norm, st.norm_history[i], c.grad_clip_relative)
                if c.agc is not None:
                    unitwise_clip(u.parameters(), c.agc)
                if not self._all_ranks(finite_loss and bool(torch.isfinite(norm))):
                    self._fault("loss" if not finite_loss else "gradient", losses, stage, where)
                opt.step(self.scaler)
                if self.scaler is not None:
                    self.scaler.update()
                sch.step()
                if u.after_step is not None:
                    u.after_step()
                if i == 0:
                    st.steps_done += 1
            prefix = "" if len(stage.updates) == 1 else f"{u.name}/"
            for k, v in losses.items():
                logged[prefix + k] = v.detach()
            logged[prefix + "grad_norm"] = norm.detach()  # before clipping: how large the update wanted to be
            if "loss" not in losses and len(losses) > 1:
                logged[prefix + "loss"] = total.detach()
        return logged


def _grad_norm(params: Any, clip: float | None) -> torch.Tensor:
    """The total gradient norm of `params` (clipped to `clip` when given): a non-finite value flags a fault."""
    params = [p for p in params if p.grad is not None]
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))


#: the running mean of train.grad_clip_relative weighs a step's norm by 0.98^(steps since): about 50 steps
NORM_DECAY = 0.98


@torch.no_grad()
def relative_clip(params: Any, norm: torch.Tensor, history: list[float], factor: float) -> None:
    """Scale the gradient down so its norm is at most `factor` times the running mean of the earlier steps'
    (``history`` = [decayed sum of norms, decayed count], updated in place with the norm as clipped); the first
    step only starts the history. Unlike a fixed threshold, this needs no knowledge of the loss's scale."""
    n = float(norm)
    if history[1] > 0:
        limit = factor * history[0] / history[1]
        if n > limit:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(limit / n)
            n = limit
    history[0] = NORM_DECAY * history[0] + n
    history[1] = NORM_DECAY * history[1] + 1.0


@torch.no_grad()
def unitwise_clip(params: Any, ratio: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition
    Without Normalization", 2021): for every output unit i of a parameter (a row of a weight matrix, a filter of
    a convolution, an element of a vector), G_i <- G_i * min(1, ratio * max(||W_i||, eps) / ||G_i||). An update
    can then change a unit's weights by a bounded fraction of their size, whatever the loss's scale."""
    for p in params:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.dim())) if p.dim() > 1 else ()
        w = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True) if dims else p.detach().abs()
        g = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True) if dims else p.grad.abs()
        limit = ratio * w.clamp_min(eps)
        p.grad.mul_(torch.where(g > limit, limit / g.clamp_min(1e-12), torch.ones_like(g)))


def _order_fingerprint(loader: BatchLoader | None, stage_index: int) -> str | None:
    """A short hash of the order in which the stage's first epoch reads its images (None for generated data):
    two runs with equal fingerprints saw their images in the same order (paired comparisons check it)."""
    if loader is None:
        return None
    loader.set_epoch(stage_index * 1_000_003)
    order = loader.order()  # None for a user's own loader, whose order kdkit does not choose
    return None if order is None else hashlib.sha1(order.numpy().tobytes()).hexdigest()[:12]


def _forget(optimizers: list[torch.optim.Optimizer], params: list[nn.Parameter]) -> None:
    """Drop the optimizers' per-parameter state (momentum, Adam moments and step) of `params`."""
    ids = {id(p) for p in params}
    for opt in optimizers:
        for p in [p for p in opt.state if id(p) in ids]:
            del opt.state[p]
