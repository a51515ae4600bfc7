"""Structured pair-wise similarity distillation (Liu et al., CVPR 2019; the loss in
:mod:`kdkit.losses.pairwise`), with pixel-wise distillation beside it as in the paper:

    L = ce_weight * CE(y_s, y) + kd_weight * L_pixelKD + pa_weight * sum_pairs L_pa(F_s, F_t)

Default pair: the last stage of both models (the paper uses the final feature maps, before the classifier).
Defaults follow the authors' training script: lambda_pa 0.5, pixel-wise KD at T = 1 with weight lambda_pi 10.
Their pixel-wise term is the cross-entropy to the teacher's softmax summed over the pixels *and the batch*,
divided by H*W; kdkit's KD term is the mean over all B*H*W pixels of the KL (the same gradient as that
cross-entropy), so at the same weight the authors' term is B times kdkit's (B = 8 in their script).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError
from ..losses import PairwiseLoss
from ..schema import opt
from . import register
from .pairs import PairDistiller, PairOptions


@dataclass
class PairwiseOptions(PairOptions):
    temperature: float = opt(1.0, "temperature of the pixel-wise KD term (the authors': 1)", gt=0)
    kd_weight: float = opt(10.0, "weight of pixel-wise KD (the authors' lambda_pi)", ge=0)
    ce_weight: float = opt(1.0, "weight of the cross-entropy on labels", ge=0)
    pa_weight: float = opt(0.5, "weight of the pair-wise similarity term (the authors' lambda_pa)", ge=0)
    scale: float = opt(0.5, "node size as a fraction of the map (max-pool kernel = int(scale * side))", gt=0, le=1)


@register
class Pairwise(PairDistiller):
    name = "pairwise"
    Options = PairwiseOptions
    tasks = ("classification", "segmentation")
    default_pairs = "last"
    term = "pa"

    def make_loss(self, s_shape: torch.Size, t_shape: torch.Size, names: tuple[str, str]) -> nn.Module:
        if len(s_shape) != 4 or len(t_shape) != 4:
            raise ModelError(f"pair-wise similarity compares feature maps [B, C, H, W]: {names[0]!r} is "
                             f"{tuple(s_shape)}, {names[1]!r} is {tuple(t_shape)}; pick convolutional layers")
        return PairwiseLoss(self.opts.scale)

    def weight(self) -> float:
        return self.opts.pa_weight
