"""Channel-wise distillation for dense prediction (Shu et al., ICCV 2021; the loss in :mod:`kdkit.losses.cwd`).

    L = ce_weight * CE(y_s, y) + cwd_weight * L_CWD(y_s, y_t) + kd_weight * L_pixelKD

applied, as in the paper's segmentation experiments, to the logit maps ``[B, K, H, W]`` of both models
(aligned to the label size), with the paper's T = 4 and weight 3. ``pairs`` adds the same loss on feature
maps (``[[student_layer, teacher_layer]]``, the student's adapted to the teacher's width by a 1x1 conv + BN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import Batch
from ..errors import ModelError
from ..losses import Adapter, cwd_loss
from ..schema import opt
from . import register
from .distiller import Distiller, DistillOptions


@dataclass
class CWDOptions(DistillOptions):
    temperature: float = opt(4.0, "temperature T of the spatial softmax per channel (and of the KD term)", gt=0)
    cwd_weight: float = opt(3.0, "weight of the channel-wise term on the logit maps", ge=0)
    kd_weight: float = opt(0.0, "weight of pixel-wise KD beside it", ge=0)
    ce_weight: float = opt(1.0, "weight of the per-pixel cross-entropy on labels", ge=0)
    pairs: list[list[str]] = opt([], "also on feature maps: [[student_layer, teacher_layer], ...]")
    feature_weight: float = opt(3.0, "weight of the channel-wise term on each feature pair", ge=0)


@register
class CWD(Distiller):
    name = "cwd"
    Options = CWDOptions
    tasks = ("segmentation",)

    def __init__(self, opts: CWDOptions, **kw: Any):
        super().__init__(opts, **kw)
        self.pairs = [(s, t) for s, t in opts.pairs]
        self.tap([s for s, _ in self.pairs], [t for _, t in self.pairs])
        self.adapters = nn.ModuleList()

    @torch.no_grad()
    def setup(self, sample: Batch) -> None:
        s_seen, t_seen = self.probe(sample)
        for s, t in self.pairs:
            fs, ft = s_seen[s], t_seen[t]
            if fs.dim() != 4 or ft.dim() != 4 or fs.shape[2:] != ft.shape[2:]:
                raise ModelError(f"cwd pairs compare maps [B, C, H, W] of one spatial size: student {s!r} is "
                                 f"{tuple(fs.shape)}, teacher {t!r} is {tuple(ft.shape)}; pick other layers")
            self.adapters.append(Adapter(fs.shape, ft.shape, "auto", "any", (s, t)).to(sample.x.device))

    def extra_losses(self, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.opts
        out = {"cwd": o.cwd_weight * cwd_loss(s_logits, t_logits, o.temperature)}
        if self.pairs:
            assert self.student_taps is not None and self.teacher_taps is not None
            out["cwd_features"] = o.feature_weight * sum(
                cwd_loss(a(self.student_taps[s]), self.teacher_taps[t], o.temperature)
                for (s, t), a in zip(self.pairs, self.adapters))
        return out

    def extra_modules(self) -> list[nn.Module]:
        return [self.adapters]
