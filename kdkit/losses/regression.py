"""Regression paths between student and teacher outputs or features.

* Logits regression (Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014):
      L = mean( (z_s - z_t)^2 )
* Feature-map regression on globally pooled features (Yang et al., "Knowledge Distillation via Softmax
  Regression Representation Learning", ICLR 2021, the "FM" term):
      L = mean_b mean_c ( mean_hw r(F_s)[b,c] - mean_hw F_t[b,c] )^2
  with r an adapter to the teacher's channels; spatial sizes may differ.
* Softmax regression (same paper, the "SR" term): the adapted student embedding passed through the
  teacher's frozen classifier h_t, regressed onto the teacher's logits:
      L = mean( (h_t(r(e_s)) - z_t)^2 )
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def logit_regression(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(z_s.float(), z_t.detach().float())


def pooled(f: torch.Tensor) -> torch.Tensor:
    """Global average over every dimension after the channels: ``[B, C, ...] -> [B, C]``."""
    return f.float().flatten(2).mean(2) if f.dim() > 2 else f.float()


def feature_map_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """MSE of globally pooled features (student features already adapted to the teacher's channels)."""
    return F.mse_loss(pooled(f_s), pooled(f_t.detach()))


class FeatureMapLoss(nn.Module):
    def __init__(self, adapter: nn.Module | None = None):
        super().__init__()
        self.adapter = adapter if adapter is not None else nn.Identity()

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return feature_map_loss(self.adapter(f_s), f_t)


class SoftmaxRegressionLoss(nn.Module):
    """MSE between the teacher's classifier applied to the adapted student embedding and the teacher logits.

    The teacher classifier is used as a function: its parameters stay frozen (never passed to an optimizer
    and with ``requires_grad`` off), while gradients flow through it to the adapter and the student.
    """

    def __init__(self, teacher_head: nn.Module, adapter: nn.Module | None = None):
        super().__init__()
        self.adapter = adapter if adapter is not None else nn.Identity()
        self._head = [teacher_head]  # a plain list: not a submodule, so not trained nor saved twice

    def forward(self, e_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        e = self.adapter(e_s.flatten(1))
        # applied as a function: calling the module would fire any taps on it (e.g. the teacher's embedding)
        z = F.linear(e, head.weight, head.bias) if isinstance(head, nn.Linear) else head(e)
        return F.mse_loss(z.float(), z_t.detach().float())
