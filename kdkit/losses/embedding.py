"""Embedding distance between L2-normalised student and teacher embeddings (the ``beta * D(z_s, z_t)``
term of Ben-Baruch et al., "It's All in the Head", 2022; KDE in their code).

    kde:    D = sum_b || z_s,b / ||z_s,b|| - z_t,b / ||z_t,b|| ||^2        (the authors' KDE: MSELoss(sum))
    l2:     D = (1/B) sum_b || z_s,b / ||z_s,b|| - z_t,b / ||z_t,b|| ||^2  (kde / B: independent of the batch)
    cosine: D = (1/B) sum_b ( 1 - cos(z_s,b, z_t,b) )

(for unit vectors l2 and cosine differ by a factor 2). Embeddings are flattened to ``[B, D]``; the student's
must already be projected to the teacher's width.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ModelError


def embedding_distance(z_s: torch.Tensor, z_t: torch.Tensor,
                       metric: Literal["kde", "l2", "cosine"] = "l2") -> torch.Tensor:
    z_s, z_t = z_s.flatten(1).float(), z_t.detach().flatten(1).float()
    if z_s.shape != z_t.shape:
        raise ModelError(f"embedding shapes differ: student {tuple(z_s.shape)} vs teacher {tuple(z_t.shape)}; "
                         "project the student's embedding first")
    if metric == "cosine":
        return (1 - F.cosine_similarity(z_s, z_t, dim=1)).mean()
    per_image = (F.normalize(z_s, dim=1) - F.normalize(z_t, dim=1)).pow(2).sum(1)
    return per_image.sum() if metric == "kde" else per_image.mean()
