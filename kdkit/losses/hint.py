"""Hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    L_hint = || r(F_s) - F_t ||^2 / numel     (mean squared error)

where F_s is the student's guided layer, F_t the teacher's hint layer and r a learned regressor (here an
:class:`~kdkit.losses.adapters.Adapter`: a 1x1 convolution (+BN) or a linear map) from student to
teacher width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HintLoss(nn.Module):
    def __init__(self, adapter: nn.Module | None = None):
        super().__init__()
        self.adapter = adapter if adapter is not None else nn.Identity()

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.adapter(f_s).float(), f_t.detach().float())
