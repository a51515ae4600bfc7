"""Object detection, CenterNet-style (Zhou, Wang & Krähenbühl, "Objects as Points", 2019).

Targets: per image, up to M boxes ``[M, 5]`` (x1, y1, x2, y2 as fractions of the image's width and height,
class index), rows of -1 padding; a batch is ``[B, M, 5]``.

A detector outputs one tensor ``[B, K + 4, h, w]`` on a grid h x w (the image's size over an integer stride):

* channels ``0..K-1``: class heatmap logits (sigmoid: the probability that an object of class k is centred in
  the cell);
* ``K, K+1``: the box's width and height, in cells;
* ``K+2, K+3``: the centre's offset inside its cell (x, y), in cells.

Training loss (CenterNet, Eq. 1-3): the penalty-reduced focal loss on the heatmaps against Gaussian bumps
centred on each object (alpha 2, beta 4, radius from the box's size at IoU 0.7), plus 0.1 x L1 on the size
and 1 x L1 on the offset at the objects' centre cells, each divided by the number of objects.

Decoding: a cell is a detection when its score is the maximum of its 3x3 neighbourhood (peak extraction, the
detector's NMS), the top 100 peaks per image kept. Metrics come from pycocotools' COCOeval (boxes scaled to
a 1000-pixel canvas; mAP@[.5:.95] and mAP@.5, which do not depend on that scale): ``map`` (primary),
``map50``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DataError, ModelError
from .base import Meter, Task, for_display
from .segmentation import dense_output_ok

ALPHA, BETA = 2.0, 4.0
SIZE_WEIGHT, OFFSET_WEIGHT = 0.1, 1.0
TOP_K = 100
CANVAS = 1000.0  # boxes are fractions of the image; COCOeval sees them on this canvas


def gaussian_radius(h: torch.Tensor, w: torch.Tensor, min_overlap: float = 0.7) -> torch.Tensor:
    """CenterNet's radius (in cells) within which a corner shift keeps IoU >= `min_overlap`, for boxes h x w;
    the smallest of its three cases (as the authors' ``gaussian_radius``)."""
    b1, c1 = h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3, c3 = -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def encode(boxes: torch.Tensor, num_classes: int, h: int, w: int) -> dict[str, torch.Tensor]:
    """Training targets of boxes ``[B, M, 5]`` on an h x w grid: the heatmaps ``[B, K, h, w]`` (Gaussian bumps,
    1 at each object's centre cell), and per object its centre cell, size and offset in cells."""
    b, m = boxes.shape[:2]
    real = boxes[..., 4] >= 0
    cx = (boxes[..., 0] + boxes[..., 2]) / 2 * w
    cy = (boxes[..., 1] + boxes[..., 3]) / 2 * h
    bw = (boxes[..., 2] - boxes[..., 0]) * w
    bh = (boxes[..., 3] - boxes[..., 1]) * h
    ix = cx.floor().clamp(0, w - 1)
    iy = cy.floor().clamp(0, h - 1)
    radius = gaussian_radius(bh.clamp_min(1e-3), bw.clamp_min(1e-3)).floor().clamp_min(0)
    sigma = (2 * radius + 1) / 6
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype).view(1, 1, 1, w)
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype).view(1, 1, h, 1)
    dx, dy = xs - ix[..., None, None], ys - iy[..., None, None]
    bump = torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma[..., None, None] ** 2))
    r = radius[..., None, None]
    bump = bump * ((dx.abs() <= r) & (dy.abs() <= r)) * real[..., None, None]  # [B, M, h, w]
    cls = boxes[..., 4].clamp_min(0).long()
    onehot = F.one_hot(cls, num_classes).to(boxes.dtype) * real[..., None]  # [B, M, K]
    heat = (bump[:, :, None] * onehot[..., None, None]).amax(1) if m else boxes.new_zeros(b, num_classes, h, w)
    return {"heat": heat, "real": real, "ix": ix.long(), "iy": iy.long(), "size": torch.stack([bw, bh], -1),
            "offset": torch.stack([cx - ix, cy - iy], -1)}


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, summed and divided by the number of objects."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_term = pos * (1 - p) ** ALPHA * torch.log(p)
    neg_term = (1 - pos) * (1 - heat) ** BETA * p ** ALPHA * torch.log(1 - p)
    return -(pos_term.sum() + neg_term.sum()) / count.clamp_min(1)


def at_centres(out: torch.Tensor, t: dict[str, torch.Tensor], channels: slice) -> torch.Tensor:
    """The output's `channels` at every object's centre cell: ``[B, M, len(channels)]``."""
    b, m = t["ix"].shape
    rows = torch.arange(b, device=out.device)[:, None].expand(b, m)
    return out[:, channels][rows, :, t["iy"], t["ix"]]


def decode(out: torch.Tensor, num_classes: int, top_k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """Boxes ``[B, k, 4]`` (fractions of the image), scores ``[B, k]`` and classes ``[B, k]`` of the top-k peaks
    of the heatmaps (a peak: the maximum of its 3x3 neighbourhood)."""
    b, _, h, w = out.shape
    heat = torch.sigmoid(out[:, :num_classes].float())
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    k = min(top_k, num_classes * h * w)
    scores, idx = peaks.flatten(1).topk(k)
    cls = idx // (h * w)
    cell = idx % (h * w)
    y, x = (cell // w).float(), (cell % w).float()
    reg = out[:, num_classes:num_classes + 4].float().flatten(2)  # [B, 4, h*w]
    g = reg.gather(2, cell[:, None].expand(b, 4, k))  # [B, 4, k]
    cx, cy = (x + g[:, 2]) / w, (y + g[:, 3]) / h
    bw, bh = g[:, 0].clamp_min(0) / w, g[:, 1].clamp_min(0) / h
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).clamp(0, 1)
    return boxes, scores, cls


def coco_map(gt: list[torch.Tensor], dets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             num_classes: int) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@.5 by pycocotools' COCOeval: `gt` holds each image's boxes ``[n, 5]`` and `dets`
    its (boxes ``[k, 4]``, scores ``[k]``, classes ``[k]``), boxes as fractions of the image."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b: torch.Tensor) -> list[float]:
        x1, y1, x2, y2 = (float(v) * CANVAS for v in b[:4])
        return [x1, y1, x2 - x1, y2 - y1]

    images, anns = [], []
    for i, g in enumerate(gt):
        images.append({"id": i, "width": CANVAS, "height": CANVAS})
        for row in g:
            box = xywh(row)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(row[4]), "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    results = [{"image_id": i, "category_id": int(c), "bbox": xywh(b), "score": float(s)}
               for i, (bs, ss, cs) in enumerate(dets) for b, s, c in zip(bs, ss, cs)]
    if not anns or not results:
        return {"map": 0.0, "map50": 0.0}
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": k, "name": str(k)} for k in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
        found = coco.loadRes(results)
        ev = COCOeval(coco, found, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": max(0.0, float(ev.stats[0])), "map50": max(0.0, float(ev.stats[1]))}


def heatmap_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over the cells of sum_k BKL(sigmoid(z_t/T) || sigmoid(z_s/T)), heatmaps ``[B, K, h, w]``,
    BKL(p || q) = p log(p / q) + (1 - p) log((1 - p) / (1 - q)); the teacher's detached."""
    t = temperature
    zs, zt = student.float() / t, teacher.detach().float() / t
    p = torch.sigmoid(zt)
    # p log p + (1-p) log(1-p) - [p log q + (1-p) log(1-q)], with log-sigmoids for stability
    bkl = (p * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - p) * (F.logsigmoid(-zt) - F.logsigmoid(-zs)))
    return bkl.sum(1).mean() * (t * t)


class DetectionMeter(Meter):
    """Each image's ground truth and detections (kept on the CPU), the summed loss and the batch count."""

    def __init__(self, num_classes: int, device: torch.device | str):
        super().__init__(2, device)
        self.k = num_classes
        self.gt: list[torch.Tensor] = []
        self.dets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, output: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> None:
        self.stats[0] += detection_loss(output, target, self.k).detach().double() * len(target)
        self.stats[1] += len(target)
        boxes, scores, cls = decode(output, self.k)
        for i in range(len(target)):
            t = target[i].cpu()
            self.gt.append(t[t[:, 4] >= 0])
            self.dets.append((boxes[i].cpu(), scores[i].cpu(), cls[i].cpu()))

    def reduce(self, dist: Any) -> None:
        import torch.distributed

        super().reduce(dist)
        gathered: list[Any] = [None] * dist.world
        torch.distributed.all_gather_object(gathered, (self.gt, self.dets))
        self.gt = [g for part in gathered for g in part[0]]
        self.dets = [d for part in gathered for d in part[1]]

    def result(self) -> dict[str, Any]:
        out = coco_map(self.gt, self.dets, self.k)
        n = max(1.0, self.stats[1].item())
        return {**out, "loss": self.stats[0].item() / n, "count": len(self.gt),
                "objects": int(sum(len(g) for g in self.gt))}


def detection_loss(out: torch.Tensor, boxes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The CenterNet training loss of output ``[B, K+4, h, w]`` against boxes ``[B, M, 5]`` (module docstring)."""
    h, w = out.shape[-2:]
    t = encode(boxes.float(), num_classes, h, w)
    real = t["real"].float()
    count = real.sum()
    loss = focal_loss(out[:, :num_classes], t["heat"], count)
    size = at_centres(out.float(), t, slice(num_classes, num_classes + 2))
    offset = at_centres(out.float(), t, slice(num_classes + 2, num_classes + 4))
    l1_size = ((size - t["size"]).abs().sum(-1) * real).sum() / count.clamp_min(1)
    l1_off = ((offset - t["offset"]).abs().sum(-1) * real).sum() / count.clamp_min(1)
    return loss + SIZE_WEIGHT * l1_size + OFFSET_WEIGHT * l1_off


class Detection(Task):
    name = "detection"
    primary = "map"
    target_kind = "boxes [M, 5]"
    card_keys = ("map50",)
    agreement_key = None  # no per-sample class to agree on
    loss_name = "det"  # focal heatmap loss + size and offset L1

    def check_output(self, out: Any, x: torch.Tensor, num_classes: int, who: str, data_name: str) -> None:
        size = tuple(x.shape[-2:])
        if not dense_output_ok(out, x, num_classes + 4):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(
                f"{who} outputs {shape} for a batch of {len(x)} images of {size[0]}x{size[1]}, expected "
                f"({len(x)}, {num_classes} + 4, H/s, W/s): {num_classes} class heatmaps, box width and height, "
                "centre offset x and y, on a grid of the image's size over an integer stride s; use a detection "
                "model (kdkit models: centernet_*)")

    def loss(self, out: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
             head: torch.nn.Module | None = None) -> torch.Tensor:
        return detection_loss(out, target, out.shape[1] - 4)

    def class_logits(self, out: torch.Tensor) -> torch.Tensor:
        return out[:, :out.shape[1] - 4]

    def box_outputs(self, out: torch.Tensor) -> torch.Tensor:
        """The box channels ``[B, 4, h, w]``: width and height, then the centre offset, in cells."""
        return out[:, out.shape[1] - 4:]

    def soft_target(self, student: torch.Tensor, teacher: torch.Tensor, opts: Any) -> torch.Tensor:
        """Soft targets on the class heatmaps: each class of each cell is a sigmoid (not a softmax over the
        classes), so the term is the binary KL at temperature T, summed over the classes and averaged over the
        cells, times T^2 (:func:`heatmap_kd`)."""
        return heatmap_kd(self.class_logits(student), self.class_logits(teacher), opts.temperature)

    def meter(self, channels: int, device: torch.device | str) -> Meter:
        return DetectionMeter(channels - 4, device)

    def check_targets(self, target: torch.Tensor, num_classes: int, where: str) -> None:
        if target.dim() != 3 or target.shape[-1] != 5:
            raise DataError(f"{where}: detection targets are boxes [N, M, 5], got {tuple(target.shape)}")

    @torch.no_grad()
    def write_examples(self, path: Any, models: dict[str, Any], loader: Any, classes: list[str],
                       count: int = 6) -> Any:
        """Rows of test images: the ground-truth boxes, then each model's detections scoring at least 0.3."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        batch = next(iter(loader))
        x, y = batch.x[:count], batch.y[:count]
        k = len(classes)
        panels: dict[str, list[list[tuple[torch.Tensor, float | None, int]]]] = {
            "ground truth": [[(r[:4], None, int(r[4])) for r in t if r[4] >= 0] for t in y.cpu()]}
        for name, m in models.items():
            was = m.training
            m.eval()
            boxes, scores, cls = decode(m(x), k)
            m.train(was)
            panels[name] = [[(b, float(s), int(c)) for b, s, c in zip(bs, ss, cs) if s >= 0.3]
                            for bs, ss, cs in zip(boxes.cpu(), scores.cpu(), cls.cpu())]
        img = for_display(x)
        h, w = img.shape[-2:]
        colours = plt.get_cmap("tab10" if k <= 10 else "tab20")
        fig, axes = plt.subplots(len(x), len(panels), figsize=(2.2 * len(panels), 2.2 * len(x)), squeeze=False)
        for i in range(len(x)):
            for j, (title, per_image) in enumerate(panels.items()):
                ax = axes[i][j]
                ax.imshow(img[i].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
                for b, s, c in per_image[i]:
                    x1, y1, x2, y2 = (float(v) for v in b)
                    colour = colours(c % 20)
                    ax.add_patch(Rectangle((x1 * w - 0.5, y1 * h - 0.5), (x2 - x1) * w, (y2 - y1) * h, fill=False,
                                           edgecolor=colour, linewidth=1.2))
                    label = classes[c] if s is None else f"{classes[c]} {s:.2f}"
                    ax.text(x1 * w, y1 * h - 1, label, color=colour, fontsize=6, va="bottom")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

