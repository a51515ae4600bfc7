"""Classifier heads over identities for embedding models: softmax, CosFace and ArcFace.

With unit embedding x and unit class weight W_k, cos(theta_k) = W_k . x, and s the scale:

* ``softmax``: z_k = W_k . x + b_k (a plain linear classifier on the raw embedding);
* ``cosface`` (Wang et al., "CosFace: Large Margin Cosine Loss", CVPR 2018): z_k = s (cos(theta_k) - m [k = y]);
* ``arcface`` (Deng et al., "ArcFace: Additive Angular Margin Loss", CVPR 2019): z_k = s cos(theta_k + m [k = y]).

ArcFace's usual details, as in the insightface implementation: cos(theta + m) = cos cos_m - sin sin_m with
sin = sqrt(1 - cos^2); where theta + m would pass pi (cos(theta) <= cos(pi - m)), the target logit becomes
cos(theta) - m sin(m) instead, which keeps it decreasing in theta (``easy_margin`` instead applies the margin
only where cos(theta) > 0). Without labels (evaluation, distillation targets) the margin is not applied:
z_k = s cos(theta_k).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HeadKind = Literal["softmax", "cosface", "arcface"]


class MarginHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, kind: HeadKind = "arcface", scale: float = 64.0,
                 margin: float = 0.5, easy_margin: bool = False):
        super().__init__()
        self.kind, self.scale, self.margin, self.easy_margin = kind, scale, margin, easy_margin
        self.in_features, self.out_features = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if kind == "softmax" else None

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """cos(theta) ``[B, K]`` between the unit embeddings and the unit class weights."""
        return F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1)).clamp(-1, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "softmax":
            return F.linear(x, self.weight, self.bias)
        cos = self.cosine(x)
        if labels is None or self.margin == 0:
            return self.scale * cos
        target = F.one_hot(labels, self.out_features).bool()
        if self.kind == "cosface":
            return self.scale * torch.where(target, cos - self.margin, cos)
        m = self.margin
        sin = (1 - cos * cos).clamp_min(0).sqrt()
        phi = cos * math.cos(m) - sin * math.sin(m)
        if self.easy_margin:
            phi = torch.where(cos > 0, phi, cos)
        else:
            phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
        return self.scale * torch.where(target, phi, cos)

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, kind={self.kind}, s={self.scale}, m={self.margin}"
                + (", easy_margin" if self.easy_margin else ""))
