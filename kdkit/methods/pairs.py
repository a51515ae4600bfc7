"""Distillers whose extra term compares student and teacher layers pair by pair.

``pairs`` lists ``[student_layer, teacher_layer]`` module paths (see :mod:`kdkit.taps`). When empty, pairs
are taken from the models' declared stages (zoo models, or paths given for your own models): the
``"middle"`` stage, or ``"all"`` stages matched by relative depth. Loss modules (with their adapters)
are created in :meth:`setup` from the shapes seen on one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..data import Batch
from ..errors import ConfigError, ModelError
from ..models import model_parts
from ..schema import opt
from .distiller import Distiller, DistillOptions


@dataclass
class PairOptions(DistillOptions):
    kd_weight: float = opt(0.0, "weight of the KD (soft-target) term", ge=0)
    ce_weight: float = opt(1.0, "weight of the cross-entropy term on labels", ge=0)
    pairs: list[list[str]] = opt([], "[[student_layer, teacher_layer], ...]; default: from the models' stages")
    resize: bool = opt(False, "resize the student map to the teacher's spatial size instead of failing")

    def validate(self, where: str) -> None:
        for i, p in enumerate(self.pairs):
            if len(p) != 2:
                raise ConfigError(f"{where}.pairs[{i}]: expected [student_layer, teacher_layer], got {p}")


def matched_stages(student: nn.Module, teacher: nn.Module, which: str,
                   fix: str = "give method.pairs=[[student_layer, teacher_layer]]") -> list[tuple[str, str]]:
    """Stage pairs matched by relative depth: the middle one, the last one, or all the student's stages."""
    s, t = model_parts(student).stages, model_parts(teacher).stages
    if not s or not t:
        raise ModelError(f"the models do not declare their stages, so layer pairs cannot be chosen; {fix}")

    def partner(i: int) -> str:
        return t[round(i * (len(t) - 1) / max(1, len(s) - 1))]

    if which == "middle":
        i = len(s) // 2
        return [(s[i], partner(i))]
    if which == "last":
        return [(s[-1], t[-1])]
    return [(s[i], partner(i)) for i in range(len(s))]


def same_grid(s_shape: torch.Size, t_shape: torch.Size, names: tuple[str, str], what: str) -> None:
    """Fail clearly unless both layers give feature maps ``[B, C, H, W]`` on one spatial grid."""
    if len(s_shape) != 4 or len(t_shape) != 4 or s_shape[2:] != t_shape[2:]:
        raise ModelError(f"{what} compares feature maps [B, C, H, W] of one spatial size: {names[0]!r} is "
                         f"{tuple(s_shape)}, {names[1]!r} is {tuple(t_shape)}; pick other layers")


class PairDistiller(Distiller):
    default_pairs: ClassVar[str] = "middle"
    term: ClassVar[str] = "pair"

    def __init__(self, opts: Any, **kw: Any):
        super().__init__(opts, **kw)
        pairs = [tuple(p) for p in opts.pairs] or matched_stages(self.student, self.teacher, self.default_pairs)
        self.pairs: list[tuple[str, str]] = pairs  # type: ignore[assignment]
        self.tap([s for s, _ in pairs], [t for _, t in pairs])
        self.pair_losses = nn.ModuleList()

    #: the loss of a layer pair, for methods whose loss needs nothing from the shapes (else override make_loss)
    pair_loss: ClassVar[type[nn.Module] | None] = None

    def make_loss(self, s_shape: torch.Size, t_shape: torch.Size, names: tuple[str, str]) -> nn.Module:
        if self.pair_loss is None:
            raise NotImplementedError
        return self.pair_loss()

    def weight(self) -> float:
        """The term's weight: option ``<term>_weight`` (override where it is named otherwise)."""
        return getattr(self.opts, f"{self.term}_weight")

    def setup(self, sample: Batch) -> None:
        s_seen, t_seen = self.probe(sample)
        for s, t in self.pairs:
            fs, ft = s_seen[s], t_seen[t]
            if not (isinstance(fs, torch.Tensor) and isinstance(ft, torch.Tensor)):
                raise ModelError(f"layers {s!r} / {t!r} do not output a single tensor; pick other layers")
            self.pair_losses.append(self.make_loss(fs.shape, ft.shape, (s, t)).to(sample.x.device))

    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.student_taps is not None and self.teacher_taps is not None
        total = sum(
            loss(self.student_taps[s], self.teacher_taps[t]) for (s, t), loss in zip(self.pairs, self.pair_losses)
        )
        return {self.term: self.weight() * total}

    def extra_modules(self) -> list[nn.Module]:
        return [self.pair_losses]
