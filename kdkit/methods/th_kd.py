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

On embeddings (``task: embedding``, the paper's face-verification setting) the models output the embedding
and the heads are margin heads over the training identities beside them (kdkit.margin_heads): the student's
is trained with it, the teacher's is read from ``head.pt`` in the teacher's run folder (or
``method.teacher_head``) and frozen. z_s, z_t and z_TH are then those heads' cosine logits s cos(theta)
without margin; the CE terms apply the margin (CE(head_s(e_s, y), y), and ``th_ce_weight``:
CE(head_t(P(e_s), y), y)). The exported student is the embedding model; evaluation is verification.

Embeddings and classifiers are found by name on zoo models (the classifier's input is the embedding)
and given by module path for other models. The TH terms train the student's backbone and the projector;
the teacher's head never changes. At the end the student head, the teacher head on the student
(``test_accuracy_teacher_head``) and their probability mix (``eval_mix``) are all evaluated, and the
exported student carries the head chosen by ``export_head``: the teacher head is folded with the
projector into one linear layer of the student's own classifier shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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
    teacher_head: str | None = opt(None, "task: embedding: the teacher's head file (default: head.pt beside the "
                                         "teacher's model.pt)")


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
        self.projector: nn.Module | None = None
        #: task: embedding: the teacher's margin head (frozen, read in setup); the student's is self.head
        self.teacher_margin_head: nn.Module | None = None
        if self.head is not None:  # embeddings: the heads live beside the models
            self.s_head_path = self.t_head_path = ""
            self.widths = (self.info.output_size, self.info.output_size)
            return
        self.s_head_path = model_parts(self.student, classifier=opts.student_classifier).classifier
        self.t_head_path = model_parts(self.teacher, classifier=opts.teacher_classifier).classifier
        s_head = linear_head(self.student, self.s_head_path, "student")
        t_head = linear_head(self.teacher, self.t_head_path, "teacher")
        if s_head.out_features != t_head.out_features:
            raise ModelError(f"student and teacher classify {s_head.out_features} and {t_head.out_features} classes")
        self.widths = (s_head.in_features, t_head.in_features)
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

    @torch.no_grad()
    def setup(self, sample: Batch) -> None:
        super().setup(sample)
        if self.head is None:
            return
        from ..margin_heads import MarginHead

        path = self.opts.teacher_head
        if path is None:
            spec = self.specs.get("teacher", (None,))[0]
            if spec is None or not spec.checkpoint:
                raise ModelError("head sharing on embeddings needs the teacher's head: give the teacher as a kdkit "
                                 "model file (head.pt beside it) or method.teacher_head")
            path = str(Path(spec.checkpoint).with_name("head.pt"))
        if not Path(path).is_file():
            raise ModelError(f"{path} not found: head sharing on embeddings reads the teacher's head over the "
                             "identities, which kdkit train saves as head.pt in its run folder; give "
                             "method.teacher_head")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        emb = saved.get("embedding") or {}
        weight = saved["state_dict"]["weight"]
        if weight.shape[0] != self.info.num_classes:
            raise ModelError(f"{path} classifies {weight.shape[0]} identities but the training data has "
                             f"{self.info.num_classes}; use the head of a teacher trained on these identities")
        head = MarginHead(weight.shape[1], weight.shape[0], emb.get("head", "arcface"), float(emb.get("scale", 64.0)),
                          float(emb.get("margin", 0.5)), bool(emb.get("easy_margin", False)))
        head.load_state_dict(saved["state_dict"])
        self.teacher_margin_head = head.requires_grad_(False).to(sample.x.device)
        self.widths = (self.info.output_size, weight.shape[1])
        if self.widths[0] != self.widths[1] and self.wants_projector():
            self.projector = make_projector(*self.widths, self.opts.projector_bn).to(sample.x.device)

    # ---- heads --------------------------------------------------------------------------------
    @property
    def teacher_head(self) -> nn.Module:
        if self.teacher_margin_head is not None:
            return self.teacher_margin_head
        return linear_head(self.teacher, self.t_head_path, "teacher")

    @property
    def student_head(self) -> nn.Module:
        if self.head is not None:
            return self.head
        return linear_head(self.student, self.s_head_path, "student")

    def soft_term(self, s_out: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
        if self.teacher_margin_head is None:
            return super().soft_term(s_out, t_out)
        assert self.head is not None
        return self.opts.soft(self.head(s_out), self.teacher_margin_head(t_out))

    def project(self, e_s: torch.Tensor) -> torch.Tensor:
        e_s = e_s.flatten(1)
        return e_s if self.projector is None else self.projector(e_s)

    def apply_teacher_head(self, e: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's (frozen) head as a function: calling the module would fire its taps and overwrite
        the teacher's recorded embedding (a margin head, beside the model, is called; `labels` apply its margin)."""
        if self.teacher_margin_head is not None:
            return self.teacher_margin_head(e, labels)
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
        o = self.opts
        out: dict[str, torch.Tensor] = {}
        if not (o.th_weight or o.th_ce_weight or o.emb_weight):
            return out
        if self.teacher_margin_head is not None:  # embeddings: the outputs are the embeddings
            e_s, e_t = s_logits, t_logits
            t_logits = self.teacher_margin_head(e_t)
        else:
            assert self.student_taps is not None and self.teacher_taps is not None
            e_s, e_t = self.student_taps[self.s_emb], self.teacher_taps[self.t_emb]
        p = self.project(e_s)
        if o.th_weight:
            out["th"] = o.th_weight * o.soft(self.apply_teacher_head(p), t_logits)
        if o.th_ce_weight:
            if batch.y is None:
                raise ModelError("th_ce_weight > 0 needs labels; set method.th_ce_weight=0")
            out["th_ce"] = o.th_ce_weight * F.cross_entropy(self.apply_teacher_head(p, batch.y), batch.y)
        if o.emb_weight:
            out["emb"] = o.emb_weight * embedding_distance(p, e_t, o.emb_metric)
        return out

    def extra_modules(self) -> list[nn.Module]:
        return [self.projector] if self.projector is not None else []

    # ---- evaluation and export ------------------------------------------------------------------
    def head_variants(self) -> dict[str, nn.Module]:
        """The student with the teacher's head, and with the mix of both heads (when they can be compared);
        none on embeddings, whose evaluation does not go through a head."""
        if self.head is not None or (self.widths[0] != self.widths[1] and self.projector is None):
            return {}
        th = self.folded_teacher_head()
        return {
            "teacher_head": with_head(self.student, self.s_head_path, th),
            "mix": with_head(self.student, self.s_head_path, MixedHead.of(self.student_head, th, self.opts.eval_mix)),
        }

    def extra_eval_models(self) -> dict[str, nn.Module]:
        return self.head_variants()

    def export_model(self) -> nn.Module:
        if self.opts.export_head == "student" or self.head is not None:
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
    tasks = ("classification", "embedding")
