"""Detection distillation losses on the outputs and features of a CenterNet-style detector.

**Fine-grained feature imitation** (Wang, Yuan, Zhang & Feng, "Distilling Object Detectors with Fine-grained
Feature Imitation", CVPR 2019). The student imitates the teacher's feature map only at locations near objects:

    L_imit = 1 / (2 N_p) * sum_{i,j} I_ij * sum_c ( f_adap(s)_{ijc} - t_{ijc} )^2,     N_p = sum_{i,j} I_ij

(the authors' code: ``(pow(t - adap(s), 2) * mask).sum() / (mask.sum() * 2)``, weight 0.01, no imitation for
the first 400 steps). Their mask I marks the locations one of whose anchors has an IoU with a ground-truth box
above psi = 0.5 times that box's best anchor IoU. An anchor-free detector has no anchors; kdkit places at every
location a box of the ground truth's own size (the anchor that fits it best) and applies the same rule: a
location is kept when that box, centred there, overlaps the ground truth by more than psi times the best
overlap (which is 1, at its centre). :func:`imitation_mask` computes it.

**Box imitation**: the student's box sizes and centre offsets match the teacher's, L1 per location weighted by
the teacher's highest class probability there (so only where the teacher sees an object):

    L_box = sum_{ij} m_ij * sum_c | b^s_{ijc} - b^t_{ijc} | / sum_{ij} m_ij,     m_ij = max_k sigmoid(z^t_{kij})
"""

from __future__ import annotations

import torch


def imitation_mask(boxes: torch.Tensor, h: int, w: int, psi: float = 0.5) -> torch.Tensor:
    """``[B, h, w]`` (0/1): the locations where a box of a ground truth's size, centred on the location, has an IoU
    with that ground truth above `psi` times the best such IoU, for any ground truth of ``boxes [B, M, 5]``
    (fractions of the image, class; rows of -1 pad)."""
    real = boxes[..., 4] >= 0  # [B, M]
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    bw, bh = (x2 - x1).clamp_min(1e-6), (y2 - y1).clamp_min(1e-6)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    gx = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) / w
    gy = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) / h
    dx = (gx.view(1, 1, 1, w) - cx[..., None, None]).abs()  # [B, M, 1, w]
    dy = (gy.view(1, 1, h, 1) - cy[..., None, None]).abs()  # [B, M, h, 1]
    inter = (bw[..., None, None] - dx).clamp_min(0) * (bh[..., None, None] - dy).clamp_min(0)
    area = (bw * bh)[..., None, None]
    iou = inter / (2 * area - inter)  # [B, M, h, w]: the same-size box shifted to each location
    best = iou.flatten(2).amax(2)[..., None, None]
    keep = (iou > psi * best) & real[..., None, None]
    return keep.any(1).to(boxes.dtype)


def masked_imitation(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_imit between adapted student features and the teacher's, ``[B, C, h, w]``, at ``mask [B, h, w]``."""
    if student.shape != teacher.shape:
        raise ValueError(f"feature imitation compares maps of one shape (adapt the student's): student "
                         f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    if mask.shape[-2:] != teacher.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask[:, None], size=teacher.shape[-2:], mode="nearest")[:, 0]
    diff = (student.float() - teacher.detach().float()).pow(2).sum(1)
    return (diff * mask).sum() / (2 * mask.sum()).clamp_min(1)


def box_imitation(student_boxes: torch.Tensor, teacher_boxes: torch.Tensor,
                  teacher_heat_logits: torch.Tensor) -> torch.Tensor:
    """L_box between box channels ``[B, 4, h, w]``, weighted by the teacher's class probability ``[B, K, h, w]``."""
    m = torch.sigmoid(teacher_heat_logits.detach().float()).amax(1)
    diff = (student_boxes.float() - teacher_boxes.detach().float()).abs().sum(1)
    return (diff * m).sum() / m.sum().clamp_min(1e-6)
