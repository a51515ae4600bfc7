"""Classifier-head utilities for head-sharing methods (TH-KD, SH-KD).

* :func:`fold` turns a chain of affine modules (Linear, eval-mode BatchNorm1d, Identity) into one
  ``nn.Linear``: a projector followed by a teacher head becomes a plain classifier of the student's
  shape, so a student that uses the teacher's head exports as its own architecture.
* :class:`MixedHead` mixes two heads' probabilities, ``p = (1 - m) softmax(z_a) + m softmax(z_b)``, and
  returns ``log p`` (a valid logit vector: its softmax is ``p``).
* :func:`head_cosine` measures how far two heads are apart: the mean over classes of the cosine
  similarity of their weight rows (through a projector when the embedding widths differ).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError


def affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) with module(x) = x W^T + b for an affine module in eval mode; None for nn.Identity."""
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.Linear):
        b = module.bias if module.bias is not None else torch.zeros(module.out_features)
        return module.weight.detach(), b.detach()
    if isinstance(module, nn.BatchNorm1d):
        scale = (module.weight if module.affine else torch.ones(module.num_features)).detach()
        shift = (module.bias if module.affine else torch.zeros(module.num_features)).detach()
        if module.running_mean is None:
            raise ModelError("cannot fold a BatchNorm1d without running statistics")
        s = scale / torch.sqrt(module.running_var + module.eps)
        return torch.diag(s), shift - s * module.running_mean
    if isinstance(module, nn.Sequential):
        return compose(list(module))
    raise ModelError(f"cannot fold a {type(module).__name__} into a linear map")


def compose(modules: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The affine map of applying `modules` in order (None when all are identities)."""
    total: tuple[torch.Tensor, torch.Tensor] | None = None
    for m in modules:
        a = affine(m)
        if a is None:
            continue
        if total is None:
            total = a
        else:
            w, b = total
            total = (a[0] @ w, a[0] @ b + a[1])
    return total


@torch.no_grad()
def fold(*modules: nn.Module) -> nn.Linear:
    """One nn.Linear equal to applying `modules` in order (eval-mode semantics for BatchNorm)."""
    wb = compose(list(modules))
    if wb is None:
        raise ModelError("nothing to fold: every module is an identity")
    w, b = wb
    out = nn.Linear(w.shape[1], w.shape[0]).to(w.device)
    out.weight.copy_(w)
    out.bias.copy_(b)
    return out


class MixedHead(nn.Module):
    """log((1 - mix) softmax(a(x)) + mix softmax(b(x))): two heads' probabilities mixed."""

    def __init__(self, in_features: int, num_classes: int, mix: float = 0.5):
        super().__init__()
        if not 0.0 <= mix <= 1.0:
            raise ModelError(f"the head mix must be in [0, 1], got {mix}")
        self.a = nn.Linear(in_features, num_classes)
        self.b = nn.Linear(in_features, num_classes)
        self.mix = mix
        self.in_features, self.out_features = in_features, num_classes  # like the nn.Linear it replaces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pa, pb = F.softmax(self.a(x), dim=1), F.softmax(self.b(x), dim=1)
        return torch.log(((1 - self.mix) * pa + self.mix * pb).clamp_min(1e-30))

    @classmethod
    def of(cls, a: nn.Linear, b: nn.Linear, mix: float) -> MixedHead:
        m = cls(a.in_features, a.out_features, mix)
        m.a.load_state_dict(a.state_dict())
        m.b.load_state_dict(b.state_dict())
        return m.to(a.weight.device)


def with_head(model: nn.Module, path: str, head: nn.Module) -> nn.Module:
    """A copy of `model` whose submodule at `path` is replaced by `head`."""
    out = copy.deepcopy(model)
    parent_path, _, name = path.rpartition(".")
    parent = out.get_submodule(parent_path) if parent_path else out
    setattr(parent, name, head)
    return out


@torch.no_grad()
def head_cosine(student_head: nn.Linear, teacher_head: nn.Linear, projector: nn.Module | None = None) -> float | None:
    """Mean over classes of cos(W_s[k], W_t[k]); with a projector P (student -> teacher embedding),
    the teacher's rows are pulled back to the student's embedding space as W_t P. None when the widths
    differ and there is no projector to compare through."""
    ws = student_head.weight.detach().float()
    wt = teacher_head.weight.detach().float()
    if projector is not None:
        ab = compose([projector])
        if ab is not None:
            wt = wt @ ab[0].float()
    if ws.shape != wt.shape:
        return None
    return float(F.cosine_similarity(ws, wt, dim=1).mean())
