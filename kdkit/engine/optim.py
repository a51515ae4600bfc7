"""Optimizers and learning-rate schedules, per update."""

from __future__ import annotations

import math
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


def build_optimizer(params: list[Any], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = []
    for p in params:
        g = dict(p) if isinstance(p, dict) else {"params": [p]}
        scale = g.pop("lr_scale", 1.0)
        g["lr"] = cfg.lr * scale
        g["params"] = [q for q in g["params"] if q.requires_grad]
        if g["params"]:
            groups.append(g)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
               weight_decay=cfg.weight_decay)


class Schedule:
    """Per-step learning-rate factor: linear warm-up, then cosine to 0, step decay, or constant."""

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
        self._apply()

    def factor(self, step: int) -> float:
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
        return self.optimizer.param_groups[0]["lr"]

