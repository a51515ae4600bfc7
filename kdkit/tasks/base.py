"""The task interface (see :mod:`kdkit.tasks`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch


def for_display(x: torch.Tensor) -> torch.Tensor:
    """Images ``[B, C, H, W]`` (normalised model inputs) scaled to [0, 1] per image, on the CPU, for plots."""
    img = x.detach().cpu().float()
    lo, hi = img.amin(dim=(1, 2, 3), keepdim=True), img.amax(dim=(1, 2, 3), keepdim=True)
    return (img - lo) / (hi - lo).clamp_min(1e-6)


class Meter:
    """Accumulates a task's statistics over batches in one float64 tensor (summed across processes under
    torchrun), then turns them into metrics."""

    def __init__(self, size: int, device: torch.device | str):
        self.stats = torch.zeros(size, dtype=torch.float64, device=device)

    def update(self, output: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Add a batch (`index`: the samples' positions in the split)."""
        raise NotImplementedError

    def bind(self, split: Any) -> None:
        """Called with the split being scored before the first batch (default: nothing to read from it)."""

    def reduce(self, dist: Any) -> None:
        """Combine the statistics of every process under torchrun (default: sum ``stats``)."""
        from ..engine.distributed import all_reduce_sum

        all_reduce_sum(self.stats, dist)

    def result(self) -> dict[str, Any]:
        raise NotImplementedError


class Task:
    """What one kind of model output means. Subclasses set ``name``, ``primary`` and the methods below."""

    name: ClassVar[str] = ""
    #: the metric validation selects on (higher is better) and the summary reports as ``test_<primary>``
    primary: ClassVar[str] = ""
    #: what one sample's target is, for messages
    target_kind: ClassVar[str] = ""
    #: further test metrics shown on the report card beside the primary one
    card_keys: ClassVar[tuple[str, ...]] = ()
    #: the name of the supervised loss in logs (train/<name>)
    loss_name: ClassVar[str] = "ce"
    #: the report card's key for how often student and teacher predict the same (None: not measured)
    agreement_key: ClassVar[str | None] = None

    def check_output(self, out: Any, x: torch.Tensor, num_classes: int, who: str, data_name: str) -> None:
        """Raise a ModelError (one line: expected and received shapes) if `out`, the output of a model on the
        batch `x`, breaks this task's contract."""
        raise NotImplementedError

    def align(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output as the targets of the batch `x` are laid out (default: as it is)."""
        return out

    def loss(self, out: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
             head: torch.nn.Module | None = None) -> torch.Tensor:
        """The supervised loss of the (aligned) output against the targets (`head`: the method's classifier head,
        for tasks whose outputs are not logits)."""
        raise NotImplementedError

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Hard predictions from the (aligned) output: class per sample, or per pixel."""
        return out.argmax(1)

    def make_head(self, dim: int, num_classes: int) -> torch.nn.Module | None:
        """The trainable classifier head a method needs on top of outputs of width `dim` (None: outputs are logits)."""
        return None

    def configured(self, options: dict[str, Any]) -> Task:
        """This task with run options (the embedding section); most tasks have none."""
        return self

    def meter(self, channels: int, device: torch.device | str) -> Meter:
        """A fresh meter for a model whose output has `channels` channels (dimension 1)."""
        raise NotImplementedError

    def class_logits(self, out: torch.Tensor) -> torch.Tensor:
        """The class logits of an output (dimension 1: the classes), for soft-target and logit terms."""
        return out

    def soft_target(self, student: torch.Tensor, teacher: torch.Tensor, opts: Any) -> torch.Tensor:
        """The soft-target (KD) term between two outputs with `opts` (kdkit.methods.distiller.SoftTargets):
        softmax soft targets per sample (or per pixel, for dense outputs)."""
        return opts.soft(self.class_logits(student), self.class_logits(teacher))

    def write_examples(self, path: Any, models: dict[str, Any], loader: Any, classes: list[str],
                       count: int = 6) -> Any:
        """Draw a few test samples with their targets and each model's predictions into `path` (a PNG), for the
        report; None when the task has no such picture."""
        return None

    def check_targets(self, target: torch.Tensor, num_classes: int, where: str) -> None:
        """Raise a DataError if targets are out of range (done once on the data, before training)."""
