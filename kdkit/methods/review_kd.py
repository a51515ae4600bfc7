"""Knowledge review (Chen et al., CVPR 2021; the fusion and the loss in :mod:`kdkit.losses.review`):

    L = ce_weight * CE(z_s, y) + kd_weight * L_KD + min(epoch / warmup, 1) * reviewkd_weight
        * sum over levels HCL(ABF-fused student level i, teacher level i)

The levels are, shallow to deep, the student's declared stages (each paired with the teacher's stage at the
same relative depth) and the input of each classifier (the pooled feature, as a 1x1 map), as in the authors'
code (mdistiller), whose CIFAR-100 settings are the defaults: weight 1 (5 for resnet32x4 -> resnet8x4),
warm-up 20 epochs, fused width min(512, the student's last width). One deviation, forced by the model
interface: the authors read the teacher's stages before their last ReLU, which their CIFAR models return and
kdkit's zoo blocks do not expose as a module output; kdkit reads the stage outputs (``method.teacher_layers``
picks others).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import Batch
from ..errors import ConfigError, ModelError
from ..losses.review import ReviewFusion, as_map, hcl_loss
from ..models import model_parts
from ..schema import opt
from . import register
from .distiller import Distiller, DistillOptions, EpochWarmup
from .pairs import matched_stages


@dataclass
class ReviewKDOptions(DistillOptions):
    kd_weight: float = opt(0.0, "weight of a KD term besides the review loss (the authors': none)", ge=0)
    ce_weight: float = opt(1.0, "weight of the cross-entropy on labels", ge=0)
    reviewkd_weight: float = opt(1.0, "weight of the review (HCL) term (the authors' 1; 5 for resnet32x4 -> "
                                      "resnet8x4)", ge=0)
    warmup_epochs: int = opt(20, "the review term grows linearly to full weight over this many epochs (0: none)",
                             ge=0)
    max_mid_channels: int = opt(512, "upper bound of the fused width (min of it and the student's last width)",
                                ge=1)
    student_layers: list[str] = opt([], "the student's levels, shallow to deep (default: its stages, then its "
                                        "classifier's input)")
    teacher_layers: list[str] = opt([], "the teacher's levels, as many as the student's (default: its stages at "
                                        "the same relative depth, then its classifier's input)")

    def validate(self, where: str) -> None:
        if len(self.student_layers) != len(self.teacher_layers):
            raise ConfigError(f"{where}: student_layers ({len(self.student_layers)}) and teacher_layers "
                              f"({len(self.teacher_layers)}) must list as many levels; give both or neither")


@register
class ReviewKD(EpochWarmup, Distiller):
    name = "reviewkd"
    Options = ReviewKDOptions
    tasks = ("classification",)

    def __init__(self, opts: ReviewKDOptions, **kw: Any):
        super().__init__(opts, **kw)
        if opts.student_layers:
            s_layers, t_layers = list(opts.student_layers), list(opts.teacher_layers)
        else:
            fix = "give method.student_layers and method.teacher_layers"
            pairs = matched_stages(self.student, self.teacher, "all", fix)
            s_layers = [s for s, _ in pairs] + [f"{model_parts(self.student).classifier}:input"]
            t_layers = [t for _, t in pairs] + [f"{model_parts(self.teacher).classifier}:input"]
        self.s_layers, self.t_layers = s_layers, t_layers
        self.tap(s_layers, t_layers)
        self.fusion: ReviewFusion | None = None

    def _levels(self, seen: dict[str, Any], layers: list[str], who: str) -> list[torch.Tensor]:
        out = []
        for layer in layers:
            f = seen[layer]
            if not isinstance(f, torch.Tensor) or f.dim() not in (2, 4):
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ModelError(f"ReviewKD: {who} layer {layer!r} gives {got}; each level must be a feature map "
                                 f"[B, C, H, W] or a pooled [B, C]; set method.{who}_layers")
            out.append(as_map(f))
        return out

    def setup(self, sample: Batch) -> None:
        s_seen, t_seen = self.probe(sample)
        fs = self._levels(s_seen, self.s_layers, "student")
        ft = self._levels(t_seen, self.t_layers, "teacher")
        self.fusion = ReviewFusion([f.shape[1] for f in fs], [f.shape[1:] for f in ft],
                                   self.opts.max_mid_channels).to(sample.x.device)

    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.fusion is not None and self.student_taps is not None and self.teacher_taps is not None
        fs = [as_map(self.student_taps[p]) for p in self.s_layers]
        ft = [as_map(self.teacher_taps[p]).float() for p in self.t_layers]
        loss = hcl_loss(self.fusion(fs), ft)
        return {"reviewkd": self.epoch_factor() * self.opts.reviewkd_weight * loss}

    def extra_modules(self) -> list[nn.Module]:
        return [self.fusion] if self.fusion is not None else []
