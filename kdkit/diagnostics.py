"""What a user needs to see about generated images: class histogram, diversity, collapse, a picture.

The known failure of data-free distillation is collapse: the generator makes one class, or one image, and
the distillation loss goes to zero while the student learns nothing. :func:`inspect_samples` measures it
on a batch of generated images and the teacher's logits on them:

* ``class_histogram``: how many samples the teacher assigns to each class (argmax);
* ``class_max_fraction`` and ``class_entropy`` (entropy of the histogram over log K: 1 = uniform, 0 = one class);
* ``diversity``: the mean pairwise L2 distance between samples over their mean L2 norm (0 for identical
  samples; about 1.2-1.4 for real, normalised MNIST digits);
* ``collapse``: the reasons found, empty when none.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def collapse_threshold(value: float | None, num_classes: int) -> float:
    """The class fraction above which one class "dominates": ``value``, or max(0.5, 1.5 / K) when None."""
    return value if value is not None else max(0.5, 1.5 / num_classes)


@torch.no_grad()
def inspect_samples(images: torch.Tensor, logits: torch.Tensor, *, max_class_fraction: float,
                    min_diversity: float) -> dict[str, Any]:
    k = logits.shape[1]
    hist = torch.bincount(logits.argmax(dim=1), minlength=k)
    frac = hist.double() / max(1, len(images))
    nz = frac[frac > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(k)) if k > 1 else 1.0
    flat = images.detach().flatten(1).double()
    n = len(flat)
    if n > 1:
        dist = torch.cdist(flat, flat)
        pairwise = float(dist.sum() / (n * (n - 1)))
        diversity = pairwise / max(float(flat.norm(dim=1).mean()), 1e-12)
    else:
        diversity = float("nan")
    reasons = []
    top = float(frac.max())
    if top > max_class_fraction:
        reasons.append(f"class {int(frac.argmax())} holds {100 * top:.0f}% of the samples "
                       f"(threshold {100 * max_class_fraction:.0f}%)")
    if n > 1 and diversity < min_diversity:
        reasons.append(f"samples are near-identical (diversity {diversity:.3f} < {min_diversity})")
    return {"class_histogram": [int(v) for v in hist], "class_max_fraction": top, "class_entropy": entropy,
            "diversity": diversity, "collapse": reasons}


def to_unit(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Undo the input normalisation and clamp to [0, 1] for display."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images.detach().cpu() * s + m).clamp(0, 1)


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile ``[N, C, H, W]`` images in [0, 1] into one ``[C, H', W']`` picture with a white border."""
    n, c, h, w = images.shape
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def save_grid(path: str | Path, images: torch.Tensor, mean: list[float], std: list[float],
              labels: list[str] | None = None, cell_px: int = 72) -> Path:
    """Write a PNG grid of (normalised) images, each shown at about `cell_px` pixels, with its label (e.g. the
    teacher's predicted class) in a corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, h, w = images.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    pad = 2
    grid = image_grid(to_unit(images, mean, std), cols, pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    zoom = max(1.0, cell_px / max(h, w))
    fig = plt.figure(figsize=(grid.shape[2] * zoom / 100, grid.shape[1] * zoom / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    if grid.shape[0] == 1:
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    for i, label in enumerate(labels or []):
        r, q = divmod(i, cols)
        ax.text(pad + q * (w + pad) + 0.5, pad + r * (h + pad) + 0.5, label, color="yellow", fontsize=8,
                va="top", ha="left", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
