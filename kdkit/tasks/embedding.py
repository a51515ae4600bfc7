"""Embeddings and verification: a model maps an image to a vector ``[B, D]``; training classifies identities
through a head (softmax, CosFace or ArcFace: kdkit.margin_heads), evaluation asks whether two images show the
same identity, on identities never seen in training (``data.unseen_classes``).

Verification on a split: the cosine similarity of every pair of its images (at most
``embedding.max_eval_images`` images, a seeded choice beyond), genuine pairs sharing an identity, impostor pairs
not; scikit-learn's ``roc_curve`` gives the ROC. Metrics:

* ``tar_far1e-2``, ``tar_far1e-3``, ``tar_far1e-4``: the true-accept rate at the largest threshold whose
  false-accept rate is at most 1e-2, 1e-3, 1e-4; None when the split has fewer than 10 / FAR impostor pairs
  (too few to measure that rate: ``far_levels`` lists those that were);
* ``eer``: the equal error rate, where false accepts and false rejects balance (lower is better);
* ``recall_at_1``: how often an image's nearest other image (by cosine) shows the same identity, over the
  images whose identity has another image in the split.

Validation selects on ``embedding.metric`` (default ``tar_far1e-3``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError
from .base import Meter, Task

FAR_LEVELS = (1e-2, 1e-3, 1e-4)
METRICS = ("tar_far1e-2", "tar_far1e-3", "tar_far1e-4", "recall_at_1")


def far_key(far: float) -> str:
    return f"tar_far{far:.0e}".replace("e-0", "e-")


def verification(emb: torch.Tensor, labels: torch.Tensor, max_images: int = 4000, seed: int = 0,
                 pairs: torch.Tensor | None = None) -> dict[str, Any]:
    """The verification metrics (module docstring) of embeddings ``[N, D]`` with identities ``[N]``: on every
    pair, or on the listed ``pairs [P, 3]`` (i, j, same identity) of a pairs file."""
    from sklearn.metrics import roc_curve

    if pairs is None and len(emb) > max_images:
        keep = torch.randperm(len(emb), generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
        emb, labels = emb[keep], labels[keep]
    e = F.normalize(emb.float(), dim=1)
    sim = e @ e.T
    same = labels[:, None] == labels[None, :]
    if pairs is not None:
        scores, genuine = sim[pairs[:, 0], pairs[:, 1]].numpy(), pairs[:, 2].bool().numpy()
    else:
        iu = torch.triu_indices(len(e), len(e), offset=1)
        scores, genuine = sim[iu[0], iu[1]].numpy(), same[iu[0], iu[1]].numpy()
    n_gen, n_imp = int(genuine.sum()), int((~genuine).sum())
    out: dict[str, Any] = {"images": len(e), "genuine_pairs": n_gen, "impostor_pairs": n_imp}
    if n_gen == 0 or n_imp == 0:
        return {**out, **{far_key(f): None for f in FAR_LEVELS}, "eer": None, "recall_at_1": None, "far_levels": []}
    fpr, tpr, _ = roc_curve(genuine, scores)
    out["far_levels"] = []
    for f in FAR_LEVELS:
        if n_imp * f >= 10:
            out[far_key(f)] = float(tpr[np.searchsorted(fpr, f, side="right") - 1])
            out["far_levels"].append(f)
        else:
            out[far_key(f)] = None
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fpr - fnr)))
    out["eer"] = float((fpr[i] + fnr[i]) / 2)
    sim.fill_diagonal_(-2.0)
    nearest = sim.argmax(1)
    has_mate = same.sum(1) > 1
    out["recall_at_1"] = float((labels[nearest] == labels)[has_mate].float().mean()) if has_mate.any() else None
    out["roc"] = roc_points(fpr, tpr)
    return out


def roc_points(fpr: np.ndarray, tpr: np.ndarray, n: int = 200) -> dict[str, list[float]]:
    """At most `n` points of the ROC, spread evenly on a log FAR axis (for the report's plot)."""
    far = np.logspace(-5, 0, n)
    idx = np.clip(np.searchsorted(fpr, far, side="right") - 1, 0, len(fpr) - 1)
    return {"far": [float(x) for x in fpr[idx]], "tar": [float(x) for x in tpr[idx]]}


class EmbeddingMeter(Meter):
    """The split's embeddings and identities, kept on the CPU."""

    def __init__(self, max_images: int, device: torch.device | str, primary: str = "tar_far1e-3"):
        super().__init__(1, device)
        self.max_images, self.primary = max_images, primary
        self.emb: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []
        self.pairs: torch.Tensor | None = None

    def bind(self, split: Any) -> None:
        self.pairs = getattr(split, "pairs", None)

    def update(self, output: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> None:
        self.emb.append(output.detach().float().cpu())
        self.labels.append(target.detach().cpu())
        start = int(self.stats[0].item())
        self.index.append(index.cpu() if index is not None else torch.arange(start, start + len(target)))
        self.stats[0] += len(target)

    def reduce(self, dist: Any) -> None:
        import torch.distributed

        gathered: list[Any] = [None] * dist.world
        torch.distributed.all_gather_object(gathered, (self.emb, self.labels, self.index))
        self.emb = [e for part in gathered for e in part[0]]
        self.labels = [y for part in gathered for y in part[1]]
        self.index = [i for part in gathered for i in part[2]]

    def result(self) -> dict[str, Any]:
        order = torch.cat(self.index).argsort()  # the split's order (pairs index into it), whatever the ranks
        out = verification(torch.cat(self.emb)[order], torch.cat(self.labels)[order], self.max_images,
                           pairs=self.pairs)
        from ..errors import DataError

        if out["genuine_pairs"] == 0:
            raise DataError(f"verification needs two images of an identity, but each of the split's {out['images']} "
                            "images shows a different one: give several images per identity")
        if out.get(self.primary) is None:
            raise DataError(f"embedding.metric={self.primary} cannot be measured on a split of {out['images']} images "
                            f"({out['genuine_pairs']} genuine, {out['impostor_pairs']} impostor pairs; a TAR at FAR f "
                            "needs 10 / f impostor pairs): choose a higher FAR or recall_at_1, or enlarge the split")
        return {**out, "loss": float("nan"), "count": sum(len(y) for y in self.labels)}


class Embedding(Task):
    name = "embedding"
    primary = "tar_far1e-3"
    target_kind = "an identity"
    card_keys = ("tar_far1e-2", "tar_far1e-3", "tar_far1e-4", "eer", "recall_at_1")
    agreement_key = None

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = dict(options or {})
        self.primary = self.options.get("metric", type(self).primary)  # type: ignore[misc]

    def configured(self, options: dict[str, Any]) -> Embedding:
        return Embedding(options)

    def check_output(self, out: Any, x: torch.Tensor, num_classes: int, who: str, data_name: str) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(x):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"{who} outputs {shape} for a batch of {len(x)}, expected embeddings ({len(x)}, dim); "
                             "an embedding model returns one vector per image")
        dim = self.options.get("dim")
        if dim is not None and out.shape[1] != dim:
            raise ModelError(f"{who} outputs embeddings of width {out.shape[1]} but embedding.dim is {dim}; set "
                             "embedding.dim to the model's width")

    def make_head(self, dim: int, num_classes: int) -> torch.nn.Module:
        from ..margin_heads import MarginHead

        o = self.options
        return MarginHead(dim, num_classes, o.get("head", "arcface"), float(o.get("scale", 64.0)),
                          float(o.get("margin", 0.5)), bool(o.get("easy_margin", False)))

    def loss(self, out: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
             head: torch.nn.Module | None = None) -> torch.Tensor:
        if head is None:
            raise ModelError("an embedding model is trained through a classifier head over the identities; this "
                             "method has none")
        return F.cross_entropy(head(out, target), target, label_smoothing=label_smoothing)

    def meter(self, channels: int, device: torch.device | str) -> Meter:
        return EmbeddingMeter(int(self.options.get("max_eval_images", 4000)), device, self.primary)
