"""Hand-written PyTorch distillation loops: the yardstick ``kdkit bench speed`` times kdkit's engine against.

Each loop is what a careful user would write without kdkit: the teacher under ``torch.inference_mode``,
plain forward hooks for intermediate features, the loss written out with ``torch.nn.functional``, then
``zero_grad``, ``backward`` and the optimizer step. No engine, no taps, no loss modules, no logging.

A loop is built from a kdkit method after its ``setup``: it takes deep copies of the student, the teacher
and the learned extra modules (adapters, projectors, uncertainty weights), so both start from identical
weights and, step for step, compute the same mathematics. ``tests/test_bench.py`` checks that one step of
each gives the same loss and the same updated weights as kdkit's engine.

Supported: ``kd``, ``fitnets``, ``adaptive`` (paths soft_target, logits, hint, attention, gram with
uncertainty, equal or fixed weighting) and ``th_kd`` (without the optional th_ce and embedding terms).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..engine.optim import build_optimizer
from ..errors import ConfigError

#: what the hand-written loops implement, per kdkit method
SUPPORTED = ("kd", "fitnets", "adaptive", "th_kd")


def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Hinton's T^2 KL(softmax(z_t/T) || softmax(z_s/T)), batch mean."""
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                    log_target=True) * (t * t)


def _attention(f: torch.Tensor) -> torch.Tensor:
    return F.normalize((f * f).sum(dim=1).flatten(1), dim=1)


def _gram(f: torch.Tensor) -> torch.Tensor:
    v = F.normalize(f.flatten(2), dim=2)
    return v @ v.transpose(1, 2)


class HandLoop:
    """A plain training step for the same student, teacher and loss as a kdkit method."""

    def __init__(self, method: Any, train: TrainConfig):
        name = type(method).name
        if name not in SUPPORTED:
            raise ConfigError(f"no hand-written reference loop for method {name!r}; available: {', '.join(SUPPORTED)}")
        self.kind = name
        self.opts = method.opts
        self.student = copy.deepcopy(method.student).train()
        self.teacher = copy.deepcopy(method.teacher).eval()
        self.feats: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.pairs: list[tuple[str, str]] = []
        self.adapters = nn.ModuleList()
        extra: list[nn.Module] = []
        own_groups: list[dict[str, Any]] = []  # parameters with settings of their own
        if name == "fitnets":
            self.pairs = list(method.pairs)
            self.adapters = copy.deepcopy(nn.ModuleList(loss.adapter for loss in method.pair_losses))
            extra.append(self.adapters)
        elif name == "adaptive":
            self._adaptive_init(method)
            extra.append(self.adapters)
            if self.log_var is not None:  # the s_i: their own optimizer, or the student's without weight decay
                wo = method.opts.weights_optimizer
                own_groups.append({"params": [self.log_var], **({"optimizer": dict(wo)} if wo else
                                                                 {"weight_decay": 0.0})})
        elif name == "th_kd":
            if method.opts.th_ce_weight or method.opts.emb_weight:
                raise ConfigError("the hand-written th_kd loop covers ce, kd and th terms only; set "
                                  "method.th_ce_weight=0 and method.emb_weight=0")
            self.projector = copy.deepcopy(method.projector)
            self.t_head = copy.deepcopy(method.teacher_head)
            self._hook(self.student, method.s_head_path, "s:emb", pre=True)
            if self.projector is not None:
                extra.append(self.projector)
        for s, t in self.pairs:
            self._hook(self.student, s, f"s:{s}")
            self._hook(self.teacher, t, f"t:{t}")
        for m in extra:
            m.train()
        params = [p for m in (self.student, *extra) for p in m.parameters()]
        groups: list[dict[str, Any]] = [{"params": params}]
        groups += own_groups
        self.optimizer = build_optimizer(groups, train)  # the same torch optimizer and hyperparameters
        self.params = [q for g in groups for q in (g["params"] if isinstance(g, dict) else [g])]
        self.clip = train.grad_clip  # the same global-norm clipping (kdkit's default 5)
        if train.agc is not None or train.grad_clip_relative is not None:
            raise ConfigError("the hand-written loops clip by the global norm only; unset train.agc and "
                              "train.grad_clip_relative")

    def _adaptive_init(self, method: Any) -> None:
        o = method.opts
        if o.weighting not in ("uncertainty", "equal", "fixed") or o.layer_wise or o.resize:
            raise ConfigError("the hand-written adaptive loop covers uncertainty, equal and fixed weighting without "
                              "layer_wise or resize")
        self.paths = [(p.kind, list(p.pairs), p.weight) for p in method.paths]
        unsupported = sorted({k for k, _, _ in self.paths} - {"soft_target", "logits", "hint", "attention", "gram"})
        if unsupported:
            raise ConfigError(f"the hand-written adaptive loop has no path {', '.join(unsupported)}")
        order = sorted(method.pair_index, key=method.pair_index.get)
        self.adapter_of = {pair: i for i, pair in enumerate(order)}
        self.adapters = copy.deepcopy(nn.ModuleList(method.adapters[f"pair{i}"] for i in range(len(order))))
        self.log_var = copy.deepcopy(method.weighting.log_var) if o.weighting == "uncertainty" else None
        self.prior = [w if o.weighting != "equal" else 1.0 for _, _, w in self.paths]
        self.pairs = list(dict.fromkeys(pair for _, pairs, _ in self.paths for pair in pairs))

    def _hook(self, model: nn.Module, path: str, key: str, pre: bool = False) -> None:
        module = dict(model.named_modules())[path]
        if pre:
            self._handles.append(module.register_forward_pre_hook(lambda m, a: self.feats.__setitem__(key, a[0])))
        else:
            self._handles.append(module.register_forward_hook(lambda m, a, out: self.feats.__setitem__(key, out)))

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            t = self.teacher(x)
        # inference tensors cannot be saved for backward: features compared directly are cloned
        for tp in {tp for _, tp in self.pairs}:
            self.feats[f"t:{tp}"] = self.feats[f"t:{tp}"].clone()
        return t.clone()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self._teacher(x)
        s = self.student(x)
        o = self.opts
        if self.kind == "adaptive":
            return self._adaptive_loss(s, t, y)
        loss = o.ce_weight * F.cross_entropy(s, y) if o.ce_weight else s.new_zeros(())
        if o.kd_weight:
            loss = loss + o.kd_weight * _kl(s, t, o.temperature)
        if self.kind == "fitnets":
            hint = sum(F.mse_loss(a(self.feats[f"s:{sp}"]), self.feats[f"t:{tp}"])
                       for (sp, tp), a in zip(self.pairs, self.adapters))
            loss = loss + o.hint_weight * hint
        elif self.kind == "th_kd" and o.th_weight:
            e = self.feats["s:emb"].flatten(1)
            e = e if self.projector is None else self.projector(e)
            loss = loss + o.th_weight * _kl(F.linear(e, self.t_head.weight, self.t_head.bias), t, o.temperature)
        return loss

    def _adaptive_loss(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        o = self.opts
        adapted: dict[tuple[str, str], torch.Tensor] = {}
        raw = []
        for kind, pairs, _ in self.paths:
            if kind == "soft_target":
                raw.append(_kl(s, t, o.temperature))
            elif kind == "logits":
                raw.append(F.mse_loss(s, t))
            else:
                total = s.new_zeros(())
                for sp, tp in pairs:
                    fs, ft = self.feats[f"s:{sp}"], self.feats[f"t:{tp}"]
                    if kind == "attention":
                        total = total + F.mse_loss(_attention(fs), _attention(ft))
                        continue
                    if (sp, tp) not in adapted:
                        adapted[(sp, tp)] = self.adapters[self.adapter_of[(sp, tp)]](fs)
                    a = adapted[(sp, tp)]
                    total = total + (F.mse_loss(a, ft) if kind == "hint" else F.mse_loss(_gram(a), _gram(ft)))
                raw.append(total)
        losses = torch.stack(raw) * torch.tensor(self.prior)
        if self.log_var is not None:
            weighted = (torch.exp(-self.log_var) * losses).sum() + self.log_var.sum()
        else:
            weighted = losses.sum()
        loss = o.alpha * weighted
        return loss + o.ce_weight * F.cross_entropy(s, y) if o.ce_weight else loss

    def step(self, x: torch.Tensor, y: torch.Tensor,
             autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
        with autocast or contextlib.nullcontext():
            loss = self.loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_([q for q in self.params if q.grad is not None], self.clip)
        self.optimizer.step()
        self.feats.clear()
        return loss.detach()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

