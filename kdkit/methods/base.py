"""What a method is, for the engine.

A method is an ``nn.Module`` that owns every model and extra module it trains (student, adapters,
projectors, loss weights, generators...) and declares its training as a list of :class:`Stage` s. A
stage names the data it reads, its budget, the modules in training mode, and one or more
:class:`Update` s: a function from a batch to a dict of named losses, plus the parameters that loss
trains. The engine runs every stage the same way (optimizers, schedules, AMP, clipping, DDP,
checkpoints, evaluation, model selection); it never branches on a method's name.

The losses a step returns are summed into the objective, unless the dict holds ``"loss"``, which is
then the objective and the other entries are only logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..data import Batch, DataInfo

LossFn = Callable[["Batch | None"], dict[str, torch.Tensor]]


@dataclass
class Update:
    """One optimisation step: ``loss(batch)`` trains ``params`` with its own optimizer.

    ``params`` is a list of parameters or of param-group dicts (``{"params": [...], "lr_scale": 10}``
    multiplies the learning rate of that group). ``optimizer`` overrides keys of the ``train`` section
    for this update only (``{"optimizer": "adam", "lr": 1e-3, "weight_decay": 0}``). ``repeat`` runs the
    update that many times per batch (e.g. k student steps per generator step); ``after_step`` runs after
    each of its optimizer steps.
    """

    name: str
    params: list[Any]
    loss: LossFn
    repeat: int = 1
    optimizer: dict[str, Any] = field(default_factory=dict)
    #: called after each optimizer step of this update (e.g. to move an EMA copy of the trained module)
    after_step: Callable[[], None] | None = None

    def parameters(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for p in self.params:
            out.extend(p["params"] if isinstance(p, dict) else [p])
        return out


@dataclass
class Stage:
    """A phase of training with its own trainable parameters, optimizers and budget.

    ``data`` is the split it iterates ("train", "fewshot"), or None for a stage that makes its own
    inputs (data-free), which then runs ``steps_per_epoch`` steps per epoch. ``evaluate`` returns the
    model whose validation accuracy is monitored (default: the method's ``eval_model``); ``select``
    overrides ``train.select`` for this stage (``"last"`` for stages whose accuracy means nothing);
    ``monitor`` replaces validation accuracy by a label-free score for choosing the best epoch.
    """

    name: str
    updates: list[Update]
    epochs: int
    train_modules: list[nn.Module]
    data: str | None = "train"
    steps_per_epoch: int | None = None
    evaluate: Callable[[], nn.Module] | None = None
    select: str | None = None
    on_start: Callable[[], None] | None = None
    on_end: Callable[[], None] | None = None
    #: called after each epoch (after validation) with the epoch index; may return figures to log
    on_epoch_end: Callable[[int], dict[str, float] | None] | None = None
    #: the global batch size of this stage (default: train.batch_size)
    batch_size: int | None = None
    #: whether an epoch drops its last partial batch (kdkit's default for training) or keeps it
    drop_last: bool = True
    #: a label-free score (higher is better) computed after each epoch; when given, the best epoch is
    #: chosen by it instead of by validation accuracy (unless select is "last")
    monitor: Callable[[], float] | None = None

    def trainable(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for u in self.updates:
            for p in u.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())


class Method(nn.Module):
    """Base class of every training method (supervised training included)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = object
    needs_teacher: ClassVar[bool] = True
    #: False for data-free methods: the runner then never opens the training images (see kdkit.data.load_data)
    reads_training_data: ClassVar[bool] = True
    #: whether the method only works on images [C, H, W] (a generator of images, pixels optimised directly)
    needs_images: ClassVar[bool] = False
    #: whether training the student alone on the same labeled data is the baseline (train.vs_alone); False for
    #: methods without labels or data (few-shot grafting, data-free)
    has_alone_baseline: ClassVar[bool] = True
    #: the tasks (kdkit.tasks) the method works on
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    #: prefixes of state_dict keys kept out of checkpoints (frozen modules loaded from elsewhere)
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("teacher.",)

    def __init__(self, opts: Any, *, student: nn.Module, teacher: nn.Module | None, info: DataInfo,
                 train: TrainConfig):
        super().__init__()
        from ..tasks import task_for

        self.opts = opts
        self.student = student
        self.info = info
        self.train_cfg = train
        #: the run's task: the supervised loss, the output's alignment to the labels (kdkit.tasks)
        self.task = task_for(info)
        #: the student's classifier head when its outputs are not logits (embeddings: a margin head over the
        #: training identities), trained with it and saved beside the model as head.pt
        self.head = self.task.make_head(info.output_size, info.num_classes)

    # ---- hooks the engine calls -------------------------------------------------------------
    def setup(self, sample: Batch) -> None:
        """Called once before training with one batch, to create modules from observed shapes."""

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def eval_model(self) -> nn.Module:
        """The model whose accuracy is reported (during training and at the end)."""
        return self.student

    def export_model(self) -> nn.Module:
        """The plain model saved as ``model.pt`` for deployment."""
        return self.student

    def summary(self) -> dict[str, Any]:
        """Extra figures for ``summary.json``."""
        return {}

    def card_fields(self) -> dict[str, Any]:
        """Extra entries for the report card (``summary.json``: ``report_card``), e.g. a generator's collapse."""
        return {}

    def finish(self) -> None:
        """Called once after training: release hooks and other training-only machinery."""

    def set_teacher_cache(self, cache: Any) -> bool:
        """Offered a :class:`kdkit.teacher_cache.TeacherCache` at the start of a stage whose images repeat
        exactly (None at its end); return True if the method uses it. Default: not used."""
        return False

    def extra_eval_models(self) -> dict[str, nn.Module]:
        """Further models to evaluate at the end (``test_accuracy_<name>`` in the summary)."""
        return {}

    def export_patches(self) -> list[dict[str, Any]]:
        """Submodules of the exported model that differ from its architecture (see kdkit.modelfile)."""
        return []

    #: set by the runner before setup: the run's data (splits and info), for methods that need more than
    #: the batches of their stages (e.g. a label-free score on the few-shot images)
    data: Any = None

    #: set by the runner: the run directory, for methods that write their own files (None off rank 0)
    run_dir: Any = None

    #: set by the runner: role ("student", "teacher") -> (ModelConfig, factory arguments) of the models
    specs: dict[str, Any] = {}

    #: set by the runner: save_artifact(filename, model, role) writes a model file into the run directory
    #: (role "student" or "teacher" picks the architecture it is described with); None off rank 0
    save_artifact: Callable[[str, nn.Module, str], None] | None = None

    #: set by a method (to a one-line reason) to end training after the current epoch; later stages are
    #: skipped and the summary records the reason as ``stopped_by``
    stop_request: str | None = None

    #: set by a method together with ``stop_request`` when the epoch just trained must not be kept (it trained
    #: on something that taught the student nothing good, e.g. a collapsed generator's images): the engine
    #: restores the state the stage had before that epoch, and the summary keeps the epoch before it
    stop_discards_epoch: bool = False

    def may_discard_epoch(self) -> bool:
        """Whether this method may set ``stop_discards_epoch``; the engine then keeps a copy of the trainable
        state at the start of every epoch (one more copy of the student, and of a generator, in memory)."""
        return False

    def on_epoch_discarded(self) -> None:
        """Called after the engine restored the state from before the epoch that ``stop_discards_epoch``
        discarded, for a method to put back its own bookkeeping of that epoch."""

    #: set by the engine for the running stage: forget_optimizer_state(params) drops the optimizers' state
    #: (e.g. Adam's moments) of `params`, for a method that re-initialises them mid-stage
    forget_optimizer_state: Callable[[list[nn.Parameter]], None] | None = None

    def save_stage_model(self, filename: str, model: nn.Module, role: str) -> None:
        if self.save_artifact is not None:
            self.save_artifact(filename, model, role)

    # ---- helpers ----------------------------------------------------------------------------
    def run_state(self) -> dict[str, Any]:
        """Plain-Python bookkeeping the checkpoint must carry besides tensors (events, diagnostics), so a
        resumed run reports what an uninterrupted one would; restored by :meth:`load_run_state`."""
        return {}

    def load_run_state(self, state: dict[str, Any]) -> None:
        pass

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(self.frozen_prefixes)]
        if missing or unexpected:
            from ..errors import CheckpointError

            raise CheckpointError(
                f"checkpoint does not match method {self.name!r}: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; was it written by another config?"
            )


def params_of(*modules: nn.Module | None) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for m in modules:
        if m is not None:
            out.extend(m.parameters())
    return out


def as_list(x: Iterable[Any] | None) -> list[Any]:
    return list(x) if x is not None else []
