"""Student-aware teachers, SH-KD (Ben-Baruch et al., "It's All in the Head: Representation Knowledge
Distillation through Classifier Sharing", 2022).

Three stages, one command, each stage's model kept in the run directory:

1. ``student``: train a student (alone, or with KD from the given teacher: ``student_kd``); saved as
   ``stage1_student.pt``.
2. ``teacher``: train the teacher with its classifier initialised from the stage-1 student's and frozen,
   cross-entropy only. When the embedding widths differ, the teacher's embedding reaches that frozen head
   through a learned linear map Q (teacher width -> student width). As in the authors' code
   (``train_teacher.py --path_th``), the teacher is trained from scratch (``teacher_init: scratch``) on the
   whole labeled training set (``teacher_data: full``, even when ``data.train_subset`` gives the students
   less), with the teacher's own training settings (``teacher_optimizer``, ``teacher_epochs``,
   ``teacher_batch_size``); fine-tuning the given teacher on the students' data is the option
   ``teacher_init: checkpoint, teacher_data: train``. At the end Q and the head are folded into the
   teacher's own classifier; saved as ``stage2_teacher.pt``. Its own accuracy may drop: it is reported as
   ``test_accuracy_sh_teacher``.
3. ``distill``: distill a fresh student (the same initialisation as stage 1) from that teacher, with KD
   or TH-KD (``final``).

    L_1 = ce_weight CE(z_s1, y) [+ kd_weight T^2 KL(p_t || p_s1)]
    L_2 = CE(h_s1(Q(e_t)), y)                         (h_s1 frozen: the stage-1 student's head)
    L_3 = the KD or TH-KD objective with the stage-2 teacher (see kdkit.methods.th_kd)

A stage that finished is not run again when the run is resumed.

On embeddings (``task: embedding``) the heads are margin heads beside the models (kdkit.margin_heads): stage 1
trains the first student with its own head (a copy of the final student's initial head), stage 2 trains the
teacher's backbone through that head, frozen, after Q when the widths differ (margin CE), and stage 3 uses
Q then the frozen head as the teacher's head (nothing to fold: a margin head normalises its input). Stage 1
with KD (``student_kd``) is not available on embeddings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Batch
from ..errors import ConfigError
from ..heads import fold, head_cosine
from ..schema import opt
from . import register
from .base import Stage, Update, params_of
from .th_kd import HeadSharing, THKDOptions, linear_head, make_projector


@dataclass
class SHKDOptions(THKDOptions):
    final: Literal["kd", "th_kd"] = opt("kd", "stage 3: distill the fresh student with KD or TH-KD")
    th_weight: float = opt(0.0, "stage 3 with final=th_kd: weight of KD through the teacher's head", ge=0)
    student_kd: bool = opt(False, "stage 1: train the first student with KD from the given teacher (else alone)")
    student_epochs: int | None = opt(None, "stage 1 epochs (default: train.epochs)", ge=0)
    teacher_epochs: int | None = opt(None, "stage 2 epochs (default: train.epochs)", ge=0)
    teacher_init: Literal["checkpoint", "scratch"] = opt(
        "scratch", "stage 2: train the teacher from scratch (the authors') or fine-tune the given one")
    teacher_data: Literal["full", "train"] = opt(
        "full", "stage 2 data: the whole labeled training set (the authors'), or the students' (after "
        "data.train_subset)")
    teacher_optimizer: dict[str, Any] = opt({}, "stage 2 training settings: train-section keys (optimizer, lr, "
                                            "momentum, nesterov, weight_decay, schedule, warmup_epochs, ...)")
    teacher_batch_size: int | None = opt(None, "stage 2 global batch size (default: train.batch_size)", gt=0)

    def validate(self, where: str) -> None:
        if self.teacher_optimizer:
            from ..config import TrainConfig
            from ..engine.optim import update_config

            bad = sorted(set(self.teacher_optimizer) & {"epochs", "batch_size"})
            if bad:
                raise ConfigError(f"{where}.teacher_optimizer: set {', '.join(bad)} with teacher_epochs / "
                                  "teacher_batch_size")
            update_config(TrainConfig(), self.teacher_optimizer, f"{where}.teacher_optimizer")
        if self.final == "kd" and (self.th_weight or self.th_ce_weight or self.emb_weight):
            raise ConfigError(f"{where}: th_weight, th_ce_weight and emb_weight apply to final=th_kd; "
                              "set method.final=th_kd or set them to 0")


class _SharedHeadTeacher(nn.Module):
    """The stage-2 teacher for evaluation: its backbone, then [Q], then the frozen student head.

    The models belong to the method (they are not submodules here), so ``train()``/``eval()`` are passed on to
    them explicitly: evaluation must see the teacher in eval mode (BatchNorm's running statistics, and
    validation images must not update them)."""

    def __init__(self, method: SHKD):
        super().__init__()
        self._method = [method]  # not a submodule: the models belong to the method

    def train(self, mode: bool = True) -> _SharedHeadTeacher:
        super().train(mode)
        m = self._method[0]
        for part in (m.teacher, m.q, m.sh_head):
            if part is not None:
                part.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._method[0].shared_head_logits(x)


class _HeadAfter(nn.Module):
    """A margin head after an optional linear map Q: the stage-2 teacher's head on embeddings."""

    def __init__(self, q: nn.Module | None, head: nn.Module):
        super().__init__()
        self._parts = [q, head]  # not submodules: they belong to the method

    def forward(self, e: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        q, head = self._parts
        return head(e if q is None else q(e), labels)


@register
class SHKD(HeadSharing):
    name = "sh_kd"
    Options = SHKDOptions
    tasks = ("classification", "embedding")
    frozen_prefixes = ()  # the teacher is trained in stage 2, so it belongs in checkpoints

    def __init__(self, opts: SHKDOptions, **kw: Any):
        student1 = copy.deepcopy(kw["student"])  # before any hooks: the stage-1 student, same initialisation
        super().__init__(opts, **kw)
        self.student1 = student1
        self._view = [_SharedHeadTeacher(self)]
        if self.head is not None:  # embeddings: margin heads beside the models (module docstring)
            if opts.student_kd:
                raise ConfigError("method.student_kd: stage 1 with KD is not available on embeddings; set it to false")
            self.head1 = copy.deepcopy(self.head)  # the stage-1 student's head: the final student's initial one
            self.sh_head = copy.deepcopy(self.head).requires_grad_(False)  # filled from head1 in stage 2
            self.q: nn.Module | None = None
            return
        ds, dt = self.widths
        classes = self.student_head.out_features
        self.q = nn.Linear(dt, ds) if ds != dt else None
        self.sh_head = nn.Linear(ds, classes)  # filled from the stage-1 student's head; never trained

    def wants_projector(self) -> bool:
        return self.opts.final == "th_kd"

    @torch.no_grad()
    def setup(self, sample: Batch) -> None:
        if self.head is None:
            return super().setup(sample)
        ds = self.info.output_size
        dt = self.teacher(sample.x[:2]).shape[1]  # the teacher is frozen, in eval mode
        if ds != dt:
            self.q = nn.Linear(dt, ds).to(sample.x.device)
        self.teacher_margin_head = _HeadAfter(self.q, self.sh_head)
        self.widths = (ds, dt)
        if ds != dt and self.wants_projector():
            self.projector = make_projector(ds, dt, self.opts.projector_bn).to(sample.x.device)
        return None

    def head_cosine(self) -> float | None:
        if self.head is None:
            return super().head_cosine()
        return head_cosine(self.head, self.sh_head)

    # ---- stage 1 ------------------------------------------------------------------------------
    def stage1_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None and batch.y is not None
        o = self.opts
        z = self.student1(batch.x)
        if self.head is not None:  # embeddings: through the stage-1 student's own margin head
            return {"ce": o.ce_weight * self.task.loss(z, batch.y, head=self.head1)}
        out = {"ce": o.ce_weight * F.cross_entropy(z, batch.y)}
        if o.student_kd:
            out["kd"] = o.kd_weight * o.soft(z, self.teacher_logits(batch))
            assert self.teacher_taps is not None
            self.teacher_taps.clear()
        return out

    def _end_stage1(self) -> None:
        self.save_stage_model("stage1_student.pt", self.student1, "student")

    # ---- stage 2 ------------------------------------------------------------------------------
    def shared_head_logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.teacher_taps is not None
        self.teacher(x)
        e = self.teacher_taps[self.t_emb].flatten(1)
        self.teacher_taps.clear()
        return self.sh_head(e if self.q is None else self.q(e))

    def stage2_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None and batch.y is not None
        if self.teacher_margin_head is not None:  # embeddings: margin CE through Q and the frozen stage-1 head
            return {"ce": F.cross_entropy(self.teacher_margin_head(self.teacher(batch.x), batch.y), batch.y)}
        return {"ce": F.cross_entropy(self.shared_head_logits(batch.x), batch.y)}

    @torch.no_grad()
    def _start_stage2(self) -> None:
        first = self.head1 if self.head is not None else linear_head(self.student1, self.s_head_path, "student")
        self.sh_head.load_state_dict(first.state_dict())
        if self.opts.teacher_init == "scratch":
            for m in self.teacher.modules():
                if m is not self.teacher and hasattr(m, "reset_parameters"):
                    m.reset_parameters()

    @torch.no_grad()
    def _end_stage2(self) -> None:
        if self.head is not None:  # embeddings: Q and the frozen head stay the teacher's head
            self.save_stage_model("stage2_teacher.pt", self.teacher, "teacher")
            return
        folded = fold(*([self.q] if self.q is not None else []), self.sh_head)
        self.teacher_head.load_state_dict(folded.state_dict())
        self.save_stage_model("stage2_teacher.pt", self.teacher, "teacher")

    def teacher_backbone_params(self) -> list[nn.Parameter]:
        if self.head is not None:  # embeddings: the whole teacher is the backbone
            return list(self.teacher.parameters())
        head = {id(p) for p in self.teacher_head.parameters()}
        return [p for p in self.teacher.parameters() if id(p) not in head]

    # ---- stages -------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        o, tc = self.opts, self.train_cfg
        e1 = tc.epochs if o.student_epochs is None else o.student_epochs
        e2 = tc.epochs if o.teacher_epochs is None else o.teacher_epochs
        stage2_modules: list[nn.Module] = [self.teacher] + ([self.q] if self.q is not None else [])
        trained3 = [self.student, *self.extra_modules(), *([self.head] if self.head is not None else [])]
        first = [self.student1, *([self.head1] if self.head is not None else [])]
        view = (lambda: self.teacher) if self.head is not None else (lambda: self._view[0])
        return [
            Stage("student", [Update("student", params_of(*first), self.stage1_step)], e1,
                  train_modules=first, evaluate=lambda: self.student1, on_end=self._end_stage1),
            Stage("teacher", [Update("teacher", self.teacher_backbone_params() + params_of(self.q), self.stage2_step,
                                     optimizer=dict(o.teacher_optimizer))], e2,
                  train_modules=stage2_modules, evaluate=view, on_start=self._start_stage2,
                  on_end=self._end_stage2, data="train_full" if o.teacher_data == "full" else "train",
                  batch_size=o.teacher_batch_size),
            Stage("distill", [Update("student", params_of(*trained3), self.student_step)], tc.epochs,
                  train_modules=trained3, evaluate=lambda: self.student),
        ]

    def extra_eval_models(self) -> dict[str, nn.Module]:
        models: dict[str, nn.Module] = {"stage1_student": self.student1, "sh_teacher": self.teacher}
        if self.opts.final == "th_kd":
            models.update(self.head_variants())
        return models

    def summary(self) -> dict[str, Any]:
        first = None if self.head is not None else head_cosine(
            linear_head(self.student1, self.s_head_path, "student"), self.teacher_head,
            self.projector if self.opts.final == "th_kd" else None)
        return super().summary() | {"final": self.opts.final, "teacher_init": self.opts.teacher_init,
                                    "stage1_head_cosine": first}
