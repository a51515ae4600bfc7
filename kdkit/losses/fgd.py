"""Focal and global distillation for detectors (FGD: Yang, Li, Jiang, Wang, Wang, Yuan & Yuan, "Focal and Global
Knowledge Distillation for Detectors", CVPR 2022).

On one pair of feature maps F^S (after a 1x1 alignment conv when the widths differ) and F^T, ``[B, C, H, W]``:

* **Attention** of a map F with temperature T (their ``get_attention``)::

      A^S(F) = H W softmax_{hw}( mean_c |F| / T )        A^C(F) = C softmax_c( mean_{hw} |F| / T )

* **Masks** from the ground-truth boxes on the H x W grid: M_ij = 1 inside a box (cells floor(x1 W) ..
  ceil(x2 W) inclusive, likewise for rows); the scale mask S_ij = 1 / (cells of the box) inside a box (the
  smallest box wins where they overlap), and outside every box S_ij = 1 / (cells outside any box).

* **Focal feature loss** (Eq. 9), weighted by the *teacher's* attention::

      L_fea = alpha sum M S A^S_t A^C_t (F^T - F^S)^2 + beta sum (1 - M) S A^S_t A^C_t (F^T - F^S)^2

* **Attention loss** (Eq. 10): L_at = gamma ( l1(A^S_t, A^S_s) + l1(A^C_t, A^C_s) ).

* **Global loss** (Eq. 12), through a GcBlock on each side (trained with the student)::

      L_global = lambda sum ( F^T + G_t(F^T) - F^S - G_s(F^S) )^2,
      G(F) = W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k F_j) F_j))

Every sum is over the batch, the channels and the grid, divided by the batch size, as in the authors' code
(``mmdet/distillation/losses/fgd.py``): their defaults alpha 0.001, beta 0.0005, gamma 0.001, lambda 5e-6,
T 0.5 (their FCOS recipe: 0.0016, 0.0008, 0.0008, 8e-6, T 0.8). These were set for 256-channel FPN maps of
COCO images; the terms are sums, so on smaller maps they are smaller in proportion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fgd_attention(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial ``[B, H, W]`` and channel ``[B, C]`` attention of a map ``[B, C, H, W]``."""
    b, c, h, w = x.shape
    value = x.abs()
    spatial = h * w * F.softmax((value.mean(1) / temperature).reshape(b, -1), dim=1)
    channel = c * F.softmax(value.mean((2, 3)) / temperature, dim=1)
    return spatial.reshape(b, h, w), channel


def fgd_masks(boxes: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground scale mask (``M * S``) and the normalised background mask (``(1 - M) * S``), each
    ``[B, h, w]``, from ``boxes [B, M, 5]`` (x1, y1, x2, y2 as fractions of the image, class; rows of -1 pad)."""
    real = boxes[..., 4] >= 0
    x1, x2 = torch.floor(boxes[..., 0] * w), torch.ceil(boxes[..., 2] * w)
    y1, y2 = torch.floor(boxes[..., 1] * h), torch.ceil(boxes[..., 3] * h)
    area = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1))  # cells of the box, the last row and column included
    cols = torch.arange(w, device=boxes.device, dtype=boxes.dtype).view(1, 1, 1, w)
    rows = torch.arange(h, device=boxes.device, dtype=boxes.dtype).view(1, 1, h, 1)
    inside = ((cols >= x1[..., None, None]) & (cols <= x2[..., None, None])
              & (rows >= y1[..., None, None]) & (rows <= y2[..., None, None]) & real[..., None, None])
    fg = (inside * area[..., None, None]).amax(1) if boxes.shape[1] else boxes.new_zeros(boxes.shape[0], h, w)
    bg = (fg <= 0).to(boxes.dtype)
    return fg, bg / bg.sum((1, 2), keepdim=True).clamp_min(1)


class GlobalContext(nn.Module):
    """The GcBlock of FGD's global loss: context pooled by a learned spatial softmax, then a bottleneck transform
    added back to every location's channels (its last conv starts at zero, so G(F) = 0 at first)."""

    def __init__(self, channels: int):
        super().__init__()
        self.key = nn.Conv2d(channels, 1, kernel_size=1)
        nn.init.kaiming_normal_(self.key.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.key.bias)
        mid = max(1, channels // 2)
        self.transform = nn.Sequential(nn.Conv2d(channels, mid, kernel_size=1), nn.LayerNorm([mid, 1, 1]),
                                       nn.ReLU(), nn.Conv2d(mid, channels, kernel_size=1))
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weights = F.softmax(self.key(x).reshape(b, 1, -1), dim=2)  # [B, 1, HW]
        context = torch.einsum("bcn,bon->bc", x.reshape(b, c, -1), weights).reshape(b, c, 1, 1)
        return x + self.transform(context)


class FGDLoss(nn.Module):
    """FGD on one layer pair: ``forward(student_map, teacher_map, boxes)`` gives the weighted sum of the four
    terms; :meth:`terms` gives them unweighted (``fg``, ``bg``, ``attention``, ``global``)."""

    def __init__(self, student_channels: int, teacher_channels: int, temperature: float = 0.5,
                 alpha: float = 0.001, beta: float = 0.0005, gamma: float = 0.001, lam: float = 5e-6):
        super().__init__()
        self.temperature = temperature
        self.weights = {"fg": alpha, "bg": beta, "attention": gamma, "global": lam}
        self.align = (nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
                      if student_channels != teacher_channels else nn.Identity())
        self.global_s = GlobalContext(teacher_channels)
        self.global_t = GlobalContext(teacher_channels)

    def terms(self, student: torch.Tensor, teacher: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.align(student.float())
        t = teacher.detach().float()
        if s.shape != t.shape:
            raise ValueError(f"FGD compares maps of one shape after alignment: student {tuple(s.shape)}, "
                             f"teacher {tuple(t.shape)}; pick layers of one spatial size")
        n, _, h, w = t.shape
        sp_t, ch_t = fgd_attention(t, self.temperature)
        sp_s, ch_s = fgd_attention(s, self.temperature)
        fg, bg = fgd_masks(boxes.float(), h, w)
        sq = (s - t).pow(2) * sp_t[:, None] * ch_t[:, :, None, None]
        return {
            "fg": (sq * fg[:, None]).sum() / n,
            "bg": (sq * bg[:, None]).sum() / n,
            "attention": ((ch_s - ch_t).abs().sum() + (sp_s - sp_t).abs().sum()) / n,
            "global": (self.global_s(s) - self.global_t(t)).pow(2).sum() / n,
        }

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in self.terms(student, teacher, boxes).items())  # type: ignore[return-value]
