"""Teacher-head KD, TH-KD (Ben-Baruch, Karklinsky, Biton, Ben-Cohen, Lawen & Zamir, "It's All in the Head:
Representation Knowledge Distillation through Classifier Sharing", 2022).

The teacher's classifier h_t, frozen, is applied to the student's embedding e_s (through a learned
projector P when the embedding widths differ), giving z_TH = h_t(P(e_s)). With z_s, z_t the student's and
teacher's logits:

    L = ce_weight    * CE(z_s, y)                                      (gamma, the authors' -r 1)
      + kd_weight    * T^2 KL(softmax(z_t/T) || softmax(z_s/T))        (alpha, -a 1.5: KD on the student's head)
      + th_weight    * T^2 KL(softmax(z_t/T) || softmax(z_TH/T))       (beta, -b 0.02: KD through the teacher's head)
      + th_ce_weight * CE(z_TH, y)                                     (kdkit's option, not in the authors' code)
      + emb_weight   * D(P(e_s), e_t)                                  (normalised embedding distance)

The defaults are the authors' (``train_student.py --distill kdth -r 1 -a 1.5 -b 0.02``, T = 4). Their code
has no projector and requires equal embedding widths; kdkit adds a linear projector P when they differ.

Embeddings and classifiers are found by name on zoo models (the classifier's input is the embedding)
and given by module path for other models. The TH terms train the student's backbone and the projector;
the teacher's head never changes. At the end the student head, the teacher head on the student
(``test_accuracy_teacher_head``) and their probability mix (``eval_mix``) are all evaluated, and the
exported student carries the head chosen by ``export_head``: the teacher head is folded with the
projector into one linear layer of the student's own classifier shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Batch
from ..errors import ConfigError, ModelError
from ..heads import MixedHead, fold, head_cosine, with_head
from ..losses import embedding_distance
from ..models import model_parts
from ..schema import opt
from ..taps import resolve
from . import register
from .distiller import Distiller, SoftTargets


@dataclass
class THKDOptions(SoftTargets):
    ce_weight: float = opt(1.0, "weight of CE on the student's head (gamma)", ge=0)
    kd_weight: float = opt(1.5, "weight of KD between teacher and student head (alpha; authors' code: 1.5)", ge=0)
    th_weight: float = opt(0.02, "weight of KD between teacher and teacher-head-on-student (beta; authors' 0.02)",
                           ge=0)
    th_ce_weight: float = opt(0.0, "weight of CE on the teacher-head-on-student output (not in the authors' code)",
                              ge=0)
    emb_weight: float = opt(0.0, "weight of the embedding distance", ge=0)
    emb_metric: Literal["kde", "l2", "cosine"] = opt(
        "l2", "embedding distance between unit embeddings: kde (the authors' KDE: summed over the batch), l2 "
        "(kde divided by the batch size), cosine")
    projector_bn: bool = opt(False, "projector (when widths differ): linear followed by BatchNorm1d")
    init_student_head: bool = opt(False, "initialise the student's classifier from the teacher's (equal widths)")
    eval_mix: float = opt(0.5, "weight m of the teacher head in the reported mix (1-m) p_s + m p_TH", ge=0, le=1)
    export_head: Literal["student", "teacher", "mix"] = opt("student", "the head of the exported student")
    student_classifier: str | None = opt(None, "the student's classifier module (default: found)")
    teacher_classifier: str | None = opt(None, "the teacher's classifier module (default: found)")


def linear_head(model: nn.Module, path: str, who: str) -> nn.Linear:
    head = resolve(model, path)
    if not isinstance(head, nn.Linear):
        raise ModelError(f"the {who}'s classifier {path!r} is a {type(head).__name__}, not nn.Linear; give its "
                         f"linear classifier with method.{who}_classifier")
    return head


def make_projector(d_in: int, d_out: int, bn: bool) -> nn.Module:
    """Student embedding -> teacher embedding width: linear (+ BatchNorm1d)."""
    lin = nn.Linear(d_in, d_out)
    return nn.Sequential(lin, nn.BatchNorm1d(d_out)) if bn else nn.Sequential(lin)


class HeadSharing(Distiller):
    """Student + frozen teacher whose classifier is shared with the student through an optional projector."""

    def __init__(self, opts: Any, **kw: Any):
        super().__init__(opts, **kw)
        self.s_head_path = model_parts(self.student, classifier=opts.student_classifier).classifier
        self.t_head_path = model_parts(self.teacher, classifier=opts.teacher_classifier).classifier
        s_head = linear_head(self.student, self.s_head_path, "student")
        t_head = linear_head(self.teacher, self.t_head_path, "teacher")
        if s_head.out_features != t_head.out_features:
            raise ModelError(f"student and teacher classify {s_head.out_features} and {t_head.out_features} classes")
        self.widths = (s_head.in_features, t_head.in_features)
        self.projector: nn.Module | None = None
        if self.widths[0] != self.widths[1] and self.wants_projector():
            self.projector = make_projector(*self.widths, opts.projector_bn)
        if opts.init_student_head:
            if self.projector is not None:
                raise ConfigError(
                    f"method.init_student_head needs equal embedding widths; the student's is {self.widths[0]}, "
                    f"the teacher's {self.widths[1]}")
            with torch.no_grad():
                s_head.load_state_dict(t_head.state_dict())
        self.s_emb, self.t_emb = f"{self.s_head_path}:input", f"{self.t_head_path}:input"
        self.tap([self.s_emb], [self.t_emb])

    def wants_projector(self) -> bool:
        """Whether the student's embedding is ever put through the teacher's head (then a projector is
        needed when the widths differ)."""
        return True

    # ---- heads --------------------------------------------------------------------------------
    @property
    def teacher_head(self) -> nn.Linear:
        return linear_head(self.teacher, self.t_head_path, "teacher")

    @property
    def student_head(self) -> nn.Linear:
        return linear_head(self.student, self.s_head_path, "student")

    def project(self, e_s: torch.Tensor) -> torch.Tensor:
        e_s = e_s.flatten(1)
        return e_s if self.projector is None else self.projector(e_s)

    def apply_teacher_head(self, e: torch.Tensor) -> torch.Tensor:
        """The teacher's (frozen) head as a function: calling the module would fire its taps and overwrite
        the teacher's recorded embedding."""
        head = self.teacher_head
        return F.linear(e, head.weight, head.bias)

    def th_logits(self, e_s: torch.Tensor) -> torch.Tensor:
        """The teacher's (frozen) head on the student's projected embedding."""
        return self.apply_teacher_head(self.project(e_s))

    def folded_teacher_head(self) -> nn.Linear:
        """Projector then teacher head, as one linear layer of the student's classifier shape."""
        return fold(*([self.projector] if self.projector is not None else []), self.teacher_head)

    def head_cosine(self) -> float | None:
        return head_cosine(self.student_head, self.teacher_head, self.projector)

    # ---- training -------------------------------------------------------------------------------
    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.student_taps is not None and self.teacher_taps is not None
        o = self.opts
        out: dict[str, torch.Tensor] = {}
        if not (o.th_weight or o.th_ce_weight or o.emb_weight):
            return out
        p = self.project(self.student_taps[self.s_emb])
        if o.th_weight or o.th_ce_weight:
            z_th = self.apply_teacher_head(p)
            if o.th_weight:
                out["th"] = o.th_weight * o.soft(z_th, t_logits)
            if o.th_ce_weight:
                if batch.y is None:
                    raise ModelError("th_ce_weight > 0 needs labels; set method.th_ce_weight=0")
                out["th_ce"] = o.th_ce_weight * F.cross_entropy(z_th, batch.y)
        if o.emb_weight:
            out["emb"] = o.emb_weight * embedding_distance(p, self.teacher_taps[self.t_emb], o.emb_metric)
        return out

    def extra_modules(self) -> list[nn.Module]:
        return [self.projector] if self.projector is not None else []

    # ---- evaluation and export ------------------------------------------------------------------
    def head_variants(self) -> dict[str, nn.Module]:
        """The student with the teacher's head, and with the mix of both heads (when they can be compared)."""
        if self.widths[0] != self.widths[1] and self.projector is None:
            return {}
        th = self.folded_teacher_head()
        return {
            "teacher_head": with_head(self.student, self.s_head_path, th),
            "mix": with_head(self.student, self.s_head_path, MixedHead.of(self.student_head, th, self.opts.eval_mix)),
        }

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return self.head_variants()

    def export_model(self) -> nn.Module:
        if self.opts.export_head == "student":
            return self.student
        return self.head_variants()["teacher_head" if self.opts.export_head == "teacher" else "mix"]

    def export_patches(self) -> list[dict[str, Any]]:
        if self.opts.export_head != "mix":
            return []
        return [{"path": self.s_head_path, "factory": "kdkit.heads:MixedHead",
                 "args": {"in_features": self.widths[0], "num_classes": self.student_head.out_features,
                          "mix": self.opts.eval_mix}}]

    def summary(self) -> dict[str, Any]:
        return {"projector": self.projector is not None, "embedding_widths": list(self.widths),
                "head_cosine": self.head_cosine(), "export_head": self.opts.export_head}


@register
class THKD(HeadSharing):
    name = "th_kd"
    Options = THKDOptions
