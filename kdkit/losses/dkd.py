"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022).

KD's loss splits into a target-class part and a non-target-class part. With p^T = softmax(z / T), the target y,
the binary distribution b = [p_y, 1 - p_y] and the distribution over the other classes p_hat_i = p_i / (1 - p_y)
(i != y), Hinton's KD is (eq. 1 of the paper)

    KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_t,y) * KL(p_hat_t || p_hat_s)
                   = TCKD          + (1 - p_t,y) * NCKD.

DKD weights the two parts independently and drops the coupling factor (1 - p_t,y) (eq. 6):

    L_DKD = T^2 * ( alpha * TCKD + beta * NCKD ),   mean over the batch,

with the authors' CIFAR-100 settings alpha = 1, beta = 8, T = 4 and a linear warm-up of the term over the first
20 epochs. p_hat is computed exactly as a softmax over the K - 1 non-target logits; TCKD from log-softmax
probabilities (stable where p_y is near 1). With ``standardize`` the logits are first standardised (Sun et al.,
CVPR 2024, see :mod:`kdkit.losses.kd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kd import as_rows, standardized


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float = 4.0, standardize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each already multiplied by T^2 and averaged over the rows (samples, or pixels of a dense
    output whose target is a label map; rows whose target is outside ``[0, K)`` are left out)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; do teacher and student have the same classes?")
    zs, zt = as_rows(student_logits.float()), as_rows(teacher_logits.detach().float())
    y = target.reshape(-1).long()
    if len(y) != len(zs):
        raise ValueError(f"DKD needs one target per row of logits: {len(zs)} rows, {len(y)} targets")
    k = zs.shape[1]
    keep = (y >= 0) & (y < k)  # ignore_index pixels have no target class
    zs, zt, y = zs[keep], zt[keep], y[keep]
    if standardize:
        zs, zt = standardized(zs), standardized(zt)
    t = temperature
    gt = F.one_hot(y, k).bool()
    ls, lt = F.log_softmax(zs / t, dim=1), F.log_softmax(zt / t, dim=1)

    def binary(log_p: torch.Tensor) -> torch.Tensor:  # log [p_y, 1 - p_y]
        log_y = log_p[gt]
        log_rest = torch.logsumexp(log_p.masked_fill(gt, float("-inf")), dim=1)
        return torch.stack([log_y, log_rest], dim=1)

    n = max(len(y), 1)
    tckd = F.kl_div(binary(ls), binary(lt), reduction="sum", log_target=True) / n
    others = ~gt
    ns = F.log_softmax((zs / t)[others].view(-1, k - 1), dim=1)
    nt = F.log_softmax((zt / t)[others].view(-1, k - 1), dim=1)
    nckd = F.kl_div(ns, nt, reduction="sum", log_target=True) / n
    return tckd * t * t, nckd * t * t


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0, standardize: bool = False) -> torch.Tensor:
    """T^2 (alpha TCKD + beta NCKD): the DKD term (without its warm-up factor)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature, standardize)
    return alpha * tckd + beta * nckd
