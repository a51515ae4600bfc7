"""Channel-wise distillation (Shu, Liu, Gao, Yan & Shen, "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021).

Each channel c of a map ``y [N, C, H, W]`` becomes a distribution over its H*W positions,

    phi(y_c)_i = exp(y_{c,i} / T) / sum_j exp(y_{c,j} / T),

and the student matches the teacher's per channel (Eq. 3 and 4 of the paper):

    L_CWD = T^2 / (N * C) * sum_n sum_c sum_i phi(y^T_{n,c})_i * log( phi(y^T_{n,c})_i / phi(y^S_{n,c})_i )

(the authors' code, ``CriterionCWD(norm_type='channel', divergence='kl')``: a summed KL divided by N*C and
multiplied by T^2). The paper's segmentation setting applies it to the logit maps with T=4 and weight 3.
Both maps must have the same shape: give the student's features an adapter first when widths differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """L_CWD between two maps ``[N, C, H, W]`` of one shape (the teacher's detached)."""
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"channel-wise distillation compares maps [N, C, H, W] of one shape; got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    n, c = student.shape[:2]
    t = temperature
    log_s = F.log_softmax(student.float().flatten(2) / t, dim=2)
    log_t = F.log_softmax(teacher.detach().float().flatten(2) / t, dim=2)
    return F.kl_div(log_s, log_t, reduction="sum", log_target=True) * (t * t) / (n * c)


class CWDLoss(nn.Module):
    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return cwd_loss(student, teacher, self.temperature)
