"""Semantic segmentation: one class index per pixel, ``ignore_index`` (255) for pixels that count nowhere.

A model outputs logits ``[B, K, h, w]`` at the image's size, or smaller by one integer factor (a
DeepLab head at output stride 8, for instance): they are then upsampled bilinearly to the labels' size
before the loss and the metrics.

Metrics come from the confusion matrix over every labelled pixel of the split:

    IoU_k = TP_k / (TP_k + FP_k + FN_k),    mIoU = mean of IoU_k over the classes present
                                             (in the labels or the predictions; the VOC convention)
    pixel accuracy = sum_k TP_k / labelled pixels

(the definitions of torchmetrics' ``MulticlassJaccardIndex`` and the VOC/Cityscapes benchmarks; the tests
check the figures against torchmetrics).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DataError, ModelError
from .base import Meter, Task, for_display

IGNORE_INDEX = 255


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The ``[K, K]`` confusion matrix (rows: true class, columns: predicted) over the labelled pixels."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> dict[str, Any]:
    """Per-class IoU (None for a class absent from labels and predictions), mIoU and pixel accuracy."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
    miou = float(iou[present].mean()) if bool(present.any()) else 0.0
    total = float(cm.sum())
    return {"miou": miou, "pixel_accuracy": float(tp.sum()) / total if total else 0.0,
            "per_class_iou": [float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist())]}


class IoUMeter(Meter):
    """The confusion matrix (K*K entries), summed cross-entropy and labelled-pixel count."""

    def __init__(self, num_classes: int, device: torch.device | str):
        super().__init__(num_classes * num_classes + 2, device)
        self.k = num_classes

    def update(self, output: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> None:
        k = self.k
        output = output.float()
        self.stats[:k * k] += confusion(output.argmax(1), target, k).flatten().to(self.stats)
        self.stats[-2] += F.cross_entropy(output, target.long(), ignore_index=IGNORE_INDEX, reduction="sum")
        self.stats[-1] += (target != IGNORE_INDEX).sum()

    def result(self) -> dict[str, Any]:
        k = self.k
        out = iou_from_confusion(self.stats[:k * k].view(k, k))
        n = max(1.0, self.stats[-1].item())
        return {**out, "loss": self.stats[-2].item() / n, "count": int(self.stats[-1].item())}


def dense_output_ok(out: Any, x: torch.Tensor, channels: int) -> bool:
    """Whether `out` is ``[B, channels, h, w]`` for the batch `x`, on a grid of its size over an integer stride."""
    return (isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[0] == len(x) and out.shape[1] == channels
            and upsample_factor(tuple(out.shape[-2:]), tuple(x.shape[-2:])) is not None)


def upsample_factor(out_hw: tuple[int, ...], in_hw: tuple[int, ...]) -> int | None:
    """The integer factor f with in = f * out in both dimensions, or None."""
    h, w = out_hw
    big_h, big_w = in_hw
    if h <= 0 or w <= 0 or big_h % h or big_w % w or big_h // h != big_w // w:
        return None
    return big_h // h


class Segmentation(Task):
    name = "segmentation"
    primary = "miou"
    card_keys = ("pixel_accuracy",)
    agreement_key = "pixel_agreement"
    target_kind = "a label map [H, W]"

    def check_output(self, out: Any, x: torch.Tensor, num_classes: int, who: str, data_name: str) -> None:
        size = tuple(x.shape[-2:])
        if not dense_output_ok(out, x, num_classes):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(
                f"{who} outputs {shape} for a batch of {len(x)} images of {size[0]}x{size[1]}, expected "
                f"({len(x)}, {num_classes}, {size[0]}, {size[1]}) logits for {data_name}'s {num_classes} classes "
                "(or smaller by one integer factor, upsampled); use a segmentation model (kdkit models: deeplab_*, "
                "unet_*) or set num_classes")

    def align(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        if tuple(out.shape[-2:]) == size:
            return out
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)

    def loss(self, out: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
             head: torch.nn.Module | None = None) -> torch.Tensor:
        return F.cross_entropy(out, target.long(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)

    def meter(self, channels: int, device: torch.device | str) -> Meter:
        return IoUMeter(channels, device)

    @torch.no_grad()
    def write_examples(self, path: Any, models: dict[str, Any], loader: Any, classes: list[str],
                       count: int = 6) -> Any:
        """Rows of test images: the image, its ground truth, then each model's predicted label map, one colour
        per class (background black, ignored pixels white)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        batch = next(iter(loader))
        x, y = batch.x[:count], batch.y[:count]
        preds = {}
        for name, m in models.items():
            was = m.training
            m.eval()
            preds[name] = self.predict(self.align(m(x), x)).cpu()
            m.train(was)
        k = len(classes)
        colours = [(0, 0, 0)] + [plt.get_cmap("tab10" if k <= 11 else "tab20")(i % 20)[:3] for i in range(k - 1)]
        cmap = ListedColormap([*colours, (1, 1, 1)])

        def shown(m: torch.Tensor) -> Any:
            return torch.where(m == IGNORE_INDEX, torch.full_like(m, k), m).numpy()

        cols = 2 + len(preds)
        fig, axes = plt.subplots(len(x), cols, figsize=(1.9 * cols, 1.9 * len(x) + 0.6), squeeze=False)
        img = for_display(x)
        for i in range(len(x)):
            panels = [("image", None), ("ground truth", y[i].cpu())] + [(n, p[i]) for n, p in preds.items()]
            for j, (title, m) in enumerate(panels):
                ax = axes[i][j]
                if m is None:
                    ax.imshow(img[i].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
                else:
                    ax.imshow(shown(m), cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(title, fontsize=9)
        handles = [Patch(color=colours[c], label=classes[c]) for c in range(k)]
        fig.legend(handles=handles, loc="lower center", ncol=min(k, 11), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def check_targets(self, target: torch.Tensor, num_classes: int, where: str) -> None:
        if target.dim() != 3:
            raise DataError(f"{where}: segmentation labels are label maps [N, H, W], got {tuple(target.shape)}; "
                            "for one class per image set task: classification")
        bad = (target != IGNORE_INDEX) & (target >= num_classes)
        if bool(bad.any()):
            i = int(bad.flatten(1).any(1).nonzero()[0])
            v = int(target[i][bad[i]].max())
            raise DataError(f"{where}: label map {i} holds the value {v}, but there are {num_classes} classes "
                            f"(0..{num_classes - 1}, {IGNORE_INDEX} ignored); fix the masks or the class list")
