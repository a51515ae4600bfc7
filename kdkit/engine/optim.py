"""Optimizers and learning-rate schedules, per update.

An update's parameter groups normally share one torch optimizer. A group dict may carry
``"optimizer": {...}``, overrides of the ``train`` section (``optimizer``, ``lr``, ``momentum``,
``weight_decay``, ...) for that group alone: its parameters then get their own torch optimizer and
schedule, stepped after the same backward pass (e.g. the loss weights of adaptive distillation, trained
with SGD at 0.1 while the student uses Adam at 1e-3). :class:`Optimizers` holds them as one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError


def update_config(train: TrainConfig, overrides: dict[str, Any], where: str) -> TrainConfig:
    """The train section with an update's own overrides (e.g. its optimizer or lr)."""
    if not overrides:
        return train
    from ..schema import parse, to_dict

    merged = to_dict(train)
    merged.update(overrides)
    try:
        return parse(TrainConfig, merged, "train")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _torch_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)


class Optimizers:
    """The torch optimizers of one update, used as one: ``zero_grad``, ``step``, ``state_dict``.

    ``members[i]`` was built with ``configs[i]`` (the ``train`` section with its groups' overrides)."""

    def __init__(self, members: list[torch.optim.Optimizer], configs: list[TrainConfig]):
        self.members = members
        self.configs = configs

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.members:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, scaler: Any = None) -> None:
        for o in self.members:
            if scaler is not None:
                scaler.step(o)
            else:
                o.step()

    def unscale_(self, scaler: Any) -> None:
        for o in self.members:
            scaler.unscale_(o)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.members for g in o.param_groups]

    def state_dict(self) -> list[dict[str, Any]]:
        return [o.state_dict() for o in self.members]

    def load_state_dict(self, state: list[dict[str, Any]] | dict[str, Any]) -> None:
        states = [state] if isinstance(state, dict) else list(state)  # a dict: written by kdkit 0.1's one optimizer
        if len(states) != len(self.members):
            from ..errors import CheckpointError

            raise CheckpointError(f"the checkpoint holds {len(states)} optimizer(s) for an update that has "
                                  f"{len(self.members)}; was it written by another config?")
        for o, s in zip(self.members, states):
            o.load_state_dict(s)


def build_optimizer(params: list[Any], cfg: TrainConfig, where: str = "update") -> Optimizers:
    """The optimizers of `params` (parameters or group dicts with ``lr_scale``, ``weight_decay``, ...,
    and optionally ``optimizer``: train-section overrides for that group)."""
    by_setting: dict[str, tuple[TrainConfig, list[dict[str, Any]]]] = {}
    for p in params:
        g = dict(p) if isinstance(p, dict) else {"params": [p]}
        override = dict(g.pop("optimizer", None) or {})
        key = repr(sorted(override.items()))
        if key not in by_setting:
            by_setting[key] = (update_config(cfg, override, f"{where}, parameter group"), [])
        gcfg, groups = by_setting[key]
        scale = g.pop("lr_scale", 1.0)
        g["lr"] = gcfg.lr * scale
        g["params"] = [q for q in g["params"] if q.requires_grad]
        if g["params"]:
            groups.append(g)
    built = [(_torch_optimizer(groups, gcfg), gcfg) for gcfg, groups in by_setting.values() if groups]
    if not built:  # nothing trainable: an empty optimizer keeps the loop uniform
        built = [(_torch_optimizer([{"params": [], "lr": cfg.lr}], cfg), cfg)]
    return Optimizers([o for o, _ in built], [c for _, c in built])


class Schedule:
    """Per-step learning-rate factor: linear warm-up, then cosine to 0, step decay, or constant.

    Progress through the schedule is the share of the planned steps done, or, when ``time_progress`` is set
    (a run with ``train.time_budget_min``), the larger of that and the share of the budget spent: a run the
    budget stops then still reaches the end of its schedule (cosine at 0, every decay milestone passed)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, steps_per_epoch: int):
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.kind = cfg.schedule
        self.total = max(1, total_steps)
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.gamma = cfg.gamma
        epochs = self.total / max(1, steps_per_epoch)
        self.milestones = [round((m * epochs if m < 1 else m) * steps_per_epoch) for m in cfg.milestones]
        self.step_count = 0
        #: a multiplier on top of the schedule (lowered by the engine after a non-finite step)
        self.scale = 1.0
        #: the share (0..1) of the time budget spent, for schedules that end at the budget (set by the engine)
        self.time_progress: Callable[[], float] | None = None
        self._apply()

    def factor(self, step: float) -> float:
        if self.time_progress is not None:  # the step the budget's pace has reached, if further
            step = max(step, min(1.0, self.time_progress()) * self.total)
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))
        if self.kind == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for g, b in zip(self.optimizer.param_groups, self.base):
            g["lr"] = b * f * self.scale

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else 0.0


class Schedules:
    """The schedules of one update's optimizers (one each, from its own settings), stepped together."""

    def __init__(self, optimizers: Optimizers, total_steps: int, steps_per_epoch: int):
        self.members = [Schedule(o, c, total_steps, steps_per_epoch)
                        for o, c in zip(optimizers.members, optimizers.configs)]

    def step(self) -> None:
        for s in self.members:
            s.step()

    @property
    def scale(self) -> float:
        return self.members[0].scale

    @scale.setter
    def scale(self, value: float) -> None:
        for s in self.members:
            s.scale = value
            s._apply()

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group (the model's, by convention)."""
        return self.members[0].lr

    def state_dict(self) -> list[dict[str, Any]]:
        return [s.state_dict() for s in self.members]

    def load_state_dict(self, state: list[dict[str, Any]] | dict[str, Any]) -> None:
        for s, d in zip(self.members, [state] if isinstance(state, dict) else state):
            s.load_state_dict(d)
