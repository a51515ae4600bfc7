"""Seeded splits: validation/test carving and per-class subsets (nested across N for the same seed)."""

from __future__ import annotations

import torch

from ..errors import DataError


def _count(total: int, amount: float) -> int:
    return round(total * amount) if amount < 1 else int(amount)


def stratified_split(labels: torch.Tensor, amount: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, carved) indices; `amount` is a fraction (<1) or a count, carved proportionally per class (label
    maps, which have no class per image: a seeded random share)."""
    n = len(labels)
    want = _count(n, amount)
    if want <= 0:
        return torch.arange(n), torch.empty(0, dtype=torch.long)
    if want >= n:
        raise DataError(f"cannot carve {want} of {n} images for a held-out split; lower the split size")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    if labels.dim() > 1:
        carved_idx = perm[:want].sort().values
        mask = torch.ones(n, dtype=torch.bool)
        mask[carved_idx] = False
        return torch.nonzero(mask).flatten(), carved_idx
    # order the permutation class by class, then take each class's share in proportion
    carved = []
    classes = torch.unique(labels)
    shares = {int(c): (labels == c).sum().item() * want / n for c in classes}
    base = {c: int(s) for c, s in shares.items()}
    # distribute the remainder to the largest fractional parts (deterministic)
    rest = want - sum(base.values())
    for c in sorted(shares, key=lambda c: (-(shares[c] - base[c]), c))[:rest]:
        base[c] += 1
    lab = labels[perm]
    for c in classes.tolist():
        carved.append(perm[lab == c][: base[c]])
    carved_idx = torch.cat(carved).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[carved_idx] = False
    return torch.nonzero(mask).flatten(), carved_idx


def per_class(labels: torch.Tensor, n_per_class: int, seed: int, what: str) -> torch.Tensor:
    """Indices of `n_per_class` images of every class, the first ones of a seeded per-class order.

    For the same seed the N-shot set contains every smaller one (the prefix property).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        order = idx[torch.randperm(len(idx), generator=g)]
        if n_per_class > len(order):
            raise DataError(
                f"{what}={n_per_class} but class {c} has only {len(order)} training images; "
                f"use at most {len(order)}"
            )
        out.append(order[:n_per_class])
    return torch.cat(out).sort().values
