"""The teacher-student base every distillation method builds on.

It keeps the teacher frozen and in eval mode (whatever the engine or a user calls), runs it once per
batch without gradients, taps the layers the method asked for on both models, and provides the
standard terms ``ce`` (cross-entropy on labels) and ``kd`` (Hinton soft targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import Batch
from ..errors import ModelError
from ..losses import kd_loss
from ..losses.kd import KDScale
from ..schema import opt
from ..taps import Taps
from ..teacher_cache import TeacherCache
from ..weighting import NormalizedWeighting
from .base import Method, Stage, Update, params_of

#: the teacher cache's name for the logits (tap paths name the features)
_LOGITS = "logits:"


@dataclass
class SoftTargets:
    """How every soft-target (KD) term of a method is computed (see :mod:`kdkit.losses.kd`)."""

    temperature: float = opt(4.0, "softmax temperature T of the KD terms", gt=0)
    kd_scale: KDScale = opt("t2", "scale of the KD terms: t2 (Hinton's T^2) or t (the gradient bounded like a "
                                  "cross-entropy's at every T; see kdkit.losses.kd)")
    logit_standardization: bool = opt(False, "standardise both models' logits before the temperature "
                                             "(Sun et al., CVPR 2024)")

    def soft(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The KD term s(T) KL(p_t^T || p_s^T) with these settings."""
        return kd_loss(student_logits, teacher_logits, self.temperature, self.kd_scale, self.logit_standardization)


@dataclass
class DistillOptions(SoftTargets):
    kd_weight: float = opt(0.9, "weight of the KD (soft-target) term", ge=0)
    ce_weight: float = opt(0.1, "weight of the cross-entropy term on labels (0: labels unused)", ge=0)
    kd_normalize: bool = opt(False, "divide the KD term by its running mean (kdkit.weighting 'normalized'): its "
                                    "gradient then no longer grows with T^2 or the teacher's confidence")


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class Distiller(Method):
    """Student + frozen teacher. Subclasses add terms in :meth:`extra_losses` and taps in ``tap_paths``."""

    def __init__(self, opts: Any, *, student: nn.Module, teacher: nn.Module | None, info, train):
        super().__init__(opts, student=student, teacher=teacher, info=info, train=train)
        if teacher is None:
            raise ModelError(f"method {self.name!r} needs a teacher: set teacher.checkpoint")
        self.teacher = frozen(teacher)
        self.teacher_cache: TeacherCache | None = None
        #: the KD term's running-mean normaliser (kd_normalize), trained-mode state kept in checkpoints
        self.kd_normalizer = NormalizedWeighting(["kd"]) if getattr(opts, "kd_normalize", False) else None
        self.student_taps: Taps | None = None
        self.teacher_taps: Taps | None = None

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def tap(self, student_paths: list[str], teacher_paths: list[str]) -> None:
        """Tap these layers on every forward (paths checked now, with did-you-mean)."""
        self.student_taps = Taps(self.student, student_paths)
        self.teacher_taps = Taps(self.teacher, teacher_paths)

    def finish(self) -> None:
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.remove()

    @torch.no_grad()
    def probe(self, sample: Batch) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run both models on two images (eval mode, no gradients) and return what the student's and the
        teacher's taps saw, for methods that build modules from the observed shapes."""
        assert self.student_taps is not None and self.teacher_taps is not None
        was = self.student.training
        self.student.eval()
        self.teacher_forward(sample.x[:2])
        self.student(sample.x[:2])
        self.student.train(was)
        seen = dict(self.student_taps.values), dict(self.teacher_taps.values)
        self.student_taps.clear()
        self.teacher_taps.clear()
        return seen

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    def set_teacher_cache(self, cache: TeacherCache | None) -> bool:
        """Serve this stage's teacher outputs from `cache` (None: stop). Refused (False) when the stage trains
        the teacher, whose outputs then change from step to step."""
        if cache is not None and any(p.requires_grad for p in self.teacher.parameters()):
            cache = None
        self.teacher_cache = cache
        return cache is not None

    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        """The teacher's logits on `batch` (and its taps filled); with a cache, the teacher runs only on the
        images not cached yet."""
        cache, taps = self.teacher_cache, self.teacher_taps
        if cache is None:
            return self.teacher_forward(batch.x)
        miss = cache.missing(batch.index)
        n_miss = int(miss.sum())
        if n_miss:
            fresh = miss.all()
            t_logits = self.teacher_forward(batch.x if fresh else batch.x[miss.to(batch.x.device)])
            seen = dict(taps.values) if taps is not None else {}
            if not all(isinstance(v, torch.Tensor) for v in seen.values()):
                self.teacher_cache = None  # a tapped layer returns a tuple or similar: nothing to index per image
                return t_logits if fresh else self.teacher_forward(batch.x)
            cache.store(batch.index[miss], {_LOGITS: t_logits, **seen})
            if fresh:
                cache.count(0, n_miss)
                return t_logits
        cache.count(len(batch) - n_miss, n_miss)
        hit = cache.gather(batch.index, batch.x.device)
        if taps is not None:
            taps.values.update({k: v for k, v in hit.items() if k != _LOGITS})
        return hit[_LOGITS]

    def outputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's outputs on `batch`, aligned to its labels by the task (dense
        outputs upsampled to the image's size)."""
        t_logits = self.teacher_logits(batch)
        s_logits = self.student(batch.x)
        return self.task.align(s_logits, batch.x), self.task.align(t_logits, batch.x)

    def supervised(self, s_logits: torch.Tensor, batch: Batch, what: str = "ce_weight > 0") -> torch.Tensor:
        """The task's loss on labels (cross-entropy per sample or per pixel); a clear error without labels."""
        if batch.y is None:
            raise ModelError(f"method {self.name!r}: {what} needs labels, but the data has none; set ce_weight=0")
        return self.task.loss(s_logits, batch.y, head=self.head)

    def student_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None
        s_logits, t_logits = self.outputs(batch)
        losses: dict[str, torch.Tensor] = {}
        o = self.opts
        if o.ce_weight > 0:
            losses[self.task.loss_name] = o.ce_weight * self.supervised(s_logits, batch)
        if o.kd_weight > 0:
            kd = self.soft_term(s_logits, t_logits)
            losses["kd"] = o.kd_weight * (self.kd_normalizer({"kd": kd}) if self.kd_normalizer is not None else kd)
        losses.update(self.extra_losses(batch, s_logits, t_logits))
        for taps in (self.student_taps, self.teacher_taps):
            if taps is not None:
                taps.clear()
        return losses

    def soft_term(self, s_out: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
        """The KD term between the two models' outputs (the task's soft targets; head-sharing methods on embeddings
        compare their heads' logits instead)."""
        return self.task.soft_target(s_out, t_out, self.opts)

    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def extra_modules(self) -> list[nn.Module]:
        """Modules trained with the student (adapters...)."""
        return []

    def stages(self) -> list[Stage]:
        normalizer = [self.kd_normalizer] if self.kd_normalizer is not None else []
        trained = [self.student, *self.extra_modules(), *normalizer, *([self.head] if self.head is not None else [])]
        return [Stage("distill", [Update("student", params_of(*trained), self.student_step)],
                      self.train_cfg.epochs, train_modules=trained)]


class EpochFactor:
    """Mixin for a distiller that scales one of its terms by a factor of the epoch being trained. The epochs
    finished are a buffer, so checkpoints keep them and a resumed run continues where it was; each epoch logs the
    factor it used under :meth:`factor_log`. Subclasses give :meth:`epoch_factor` and may switch the mechanism
    off by an option (:meth:`factor_active`: then no buffer and no per-epoch hook)."""

    name: str
    opts: Any

    def __init__(self, opts: Any, **kw: Any):
        super().__init__(opts, **kw)  # type: ignore[call-arg]
        if self.factor_active(opts):
            self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))  # type: ignore[attr-defined]

    def factor_active(self, opts: Any) -> bool:
        return True

    def epoch_factor(self) -> float:
        raise NotImplementedError

    def factor_log(self) -> str:
        raise NotImplementedError

    def _end_factor_epoch(self, epoch: int) -> dict[str, float]:
        factor = self.epoch_factor()
        self.epochs_done += 1
        return {self.factor_log(): factor}

    def stages(self) -> list[Stage]:
        (stage,) = super().stages()  # type: ignore[misc]
        if self.factor_active(self.opts):
            stage.on_epoch_end = self._end_factor_epoch
        return [stage]


class EpochWarmup(EpochFactor):
    """Mixin for a distiller whose extra term grows linearly to full weight over ``opts.warmup_epochs`` epochs,
    counted from 1 as in the authors' code of DKD and ReviewKD (mdistiller): factor min(epoch / warmup, 1),
    logged as ``<method>_warmup``."""

    def epoch_factor(self) -> float:
        w = self.opts.warmup_epochs
        return 1.0 if w == 0 else min((int(self.epochs_done) + 1) / w, 1.0)

    def factor_log(self) -> str:
        return f"{self.name}_warmup"
