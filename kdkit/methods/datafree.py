"""What every data-free method shares: a source of synthetic images, the student's distillation on them,
a replay bank, diagnostics (sample grids, class histogram, diversity, collapse) and the generator file.

No real image is read: the runner never loads the training set for these methods (``reads_training_data``
is False), and the only real images a run sees are the test set for the final evaluation and the
validation set when ``data.val_split`` asks for one.

Compute knobs (the authors' settings are the defaults; the MNIST recipes change them, see BENCHMARKS.md):

* ``generator_width``: channels of the generator (the authors' 128; the cost of a generator step grows
  with its square);
* ``train.batch_size``: images per generator and student step (the authors' 512);
* ``student_steps``: student steps per generator step (k);
* ``bank_size``: a replay bank holding the newest generated images with the teacher's logits on them; the
  student's batches are drawn from it, so one generated (and teacher-labelled) image serves several
  student steps. 0 (the authors'): the student sees each generated batch once (or k times for k steps);
* ``sample_every``: with a bank, a method whose student samples fresh images does so every N steps only;
* ``generator_ema``: momentum m of an exponential moving average of the generator (weights and BatchNorm
  statistics, ``G_ema <- m G_ema + (1 - m) G`` after every generator step), after Momentum Adversarial
  Distillation (MAD: Do et al., NeurIPS 2022), which trains the student on samples of both G and G_ema so that
  it does not forget what earlier generators showed it. kdkit keeps the student's batch size: half of each
  student batch comes from G_ema. 0 (default, the authors' of every method here): no EMA copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..diagnostics import collapse_threshold, inspect_samples, save_grid
from ..errors import warn
from ..generators import DAFLGenerator, save_generator
from ..losses import kd_loss
from ..schema import opt
from .base import Stage, Update
from .distiller import Distiller


@dataclass
class DataFreeOptions:
    temperature: float = opt(1.0, "temperature T of the student's KD loss T^2 KL(p_t^T || p_s^T)", gt=0)
    steps_per_epoch: int = opt(120, "steps per epoch (the authors' 120 iterations)", gt=0)
    student_steps: int = opt(1, "student steps per generator step", ge=1)
    bank_size: int = opt(0, "replay bank of generated images (with teacher logits) the student draws from; 0: none",
                         ge=0)
    sample_every: int = opt(1, "with a bank, methods that sample fresh images for the student do so every N "
                            "student steps (1: every step)", ge=1)
    diagnostics_samples: int = opt(256, "generated images inspected after each epoch (histogram, diversity)", ge=2)
    grid_images: int = opt(64, "images in the PNG grid saved after each epoch (0: none)", ge=0)
    collapse_class_fraction: float | None = opt(
        None, "collapse when one class holds more than this fraction of the samples (default max(0.5, 1.5/K))",
        gt=0, le=1)
    collapse_min_diversity: float = opt(0.1, "collapse when the samples' diversity falls below this", ge=0)
    on_collapse: Literal["continue", "restart", "stop"] = opt(
        "restart", "when the generated images collapse (one class, or no diversity): re-initialise the generator "
        "and its optimizer state ('restart'), end training with the student and generator of the epoch before "
        "('stop'; the collapsed epoch is discarded), or only warn ('continue')")
    collapse_restarts: int = opt(3, "on_collapse=restart: re-initialise at most this many times, then stop", ge=0)


@dataclass
class GeneratorOptions(DataFreeOptions):
    latent_dim: int = opt(100, "dimension of the generator's noise z", gt=0)
    generator_width: int = opt(128, "channels of the generator's first convolution (the authors' 128)", ge=2)
    generator_bn_eps: float = opt(0.8, "eps of the generator's middle BatchNorms (the authors' code passes 0.8)",
                                  gt=0)
    generator_lr: float = opt(1e-3, "Adam learning rate of the generator", gt=0)
    generator_ema: float = opt(0.0, "momentum of an EMA copy of the generator that makes half of each student "
                                    "batch (MAD, Do et al., NeurIPS 2022); 0: none", ge=0, lt=1)


def constant_adam(lr: float) -> dict[str, Any]:
    """The optimizer override of updates that train synthesis (a generator, or pixels): Adam at a constant
    ``lr``, no weight decay and no gradient clipping (the authors'), whatever the ``train`` section says for the
    student."""
    return {"optimizer": "adam", "lr": lr, "weight_decay": 0.0, "schedule": "constant", "warmup_epochs": 0.0,
            "betas": [0.9, 0.999], "grad_clip": None}


class ReplayBank(nn.Module):
    """A ring buffer of generated images and the teacher's logits on them (saved in checkpoints)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.register_buffer("images", torch.empty(0))
        self.register_buffer("logits", torch.empty(0))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # images ever added

    def __len__(self) -> int:
        return min(int(self.count), self.capacity)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """Only the filled rows: a memory sized for a whole schedule (FastDFKD's) is mostly empty early on,
        and a checkpoint written every few seconds should not carry the empty part (a clone, because
        ``torch.save`` writes a view's whole storage)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if 0 < len(self) < len(self.images):
            for name in ("images", "logits"):
                destination[prefix + name] = destination[prefix + name][:len(self)].clone()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("images", "logits"):  # the buffers grow on first use: take the checkpoint's shapes
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args)
        filled = len(self.images)
        if 0 < filled < self.capacity:  # saved without its empty rows: give the ring buffer back its capacity
            for name in ("images", "logits"):
                kept = getattr(self, name)
                setattr(self, name, torch.cat([kept, kept.new_zeros((self.capacity - filled, *kept.shape[1:]))]))

    @torch.no_grad()
    def add(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        if self.images.numel() == 0:
            self.images = x.new_zeros((self.capacity, *x.shape[1:]))
            self.logits = logits.new_zeros((self.capacity, *logits.shape[1:]))
        n = min(len(x), self.capacity)
        slots = (int(self.count) + torch.arange(n, device=x.device)) % self.capacity
        self.images[slots] = x[-n:].detach()
        self.logits[slots] = logits[-n:].detach()
        self.count += len(x)

    def newest(self, n: int) -> torch.Tensor:
        """The last ``min(n, len)`` images added, newest first."""
        slots = (int(self.count) - 1 - torch.arange(min(n, len(self)))) % self.capacity
        return self.images[slots.to(self.images.device)]

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self), (n,)).to(self.images.device)
        return self.images[idx], self.logits[idx]

    def clear(self) -> None:
        self.count.zero_()


class DataFree(Distiller):
    """Base of the data-free methods: subclasses say how images are made (:meth:`produce`, or a trained
    :class:`DAFLGenerator`) and which stages run; the student's step, bank and diagnostics live here."""

    reads_training_data: ClassVar[bool] = False
    has_alone_baseline: ClassVar[bool] = False  # no training data: no student alone to train
    needs_images: ClassVar[bool] = True  # generated or optimised images
    Options = DataFreeOptions
    #: what the student distills on: the generator step's own batch ("generator_batch", joint schedules)
    #: or a fresh batch made for each student step ("fresh")
    student_data: Literal["generator_batch", "fresh"] = "fresh"
    #: epochs in a row (in which the student trained) that the student may give one class to every diagnostic
    #: image, while the teacher gives several, before the run warns that the student is not learning
    STUCK_EPOCHS: ClassVar[int] = 3

    def __init__(self, opts: Any, **kw: Any):
        super().__init__(opts, **kw)
        self.generator: DAFLGenerator | None = None
        if isinstance(opts, GeneratorOptions):
            self.generator = DAFLGenerator(self.info.input_shape, opts.latent_dim, opts.generator_width,
                                           opts.generator_bn_eps)
        #: MAD's moving average of the generator (never trained by a gradient), or None
        self.generator_ema: DAFLGenerator | None = None
        if self.generator is not None and opts.generator_ema > 0:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.bank = ReplayBank(opts.bank_size) if opts.bank_size else None
        self._latest: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("student_step_count", torch.zeros((), dtype=torch.long))
        self.collapses: list[dict[str, Any]] = []
        self.last_diagnostics: dict[str, Any] = {}
        self._diagnostics_before: dict[str, Any] = {}  # the epoch before's, for on_epoch_discarded
        #: what the compute bought (this process): synthetic images labelled by the teacher for the student
        #: ("synthesised": a generator's batches, optimised or synthesised batches) and images the student
        #: trained on ("distilled": every student step's batch, repeats counted)
        self.image_counts = {"synthesised": 0, "distilled": 0}
        #: the student's watch (:meth:`watch_student`): epochs in a row it gave one class to every diagnostic
        #: image, the distilled count at the last look, and the warning's event (None: it learns)
        self.student_watch: dict[str, Any] = {"single_class_epochs": 0, "distilled": 0, "stuck": None}

    def run_state(self) -> dict[str, Any]:
        return {"collapses": self.collapses, "last_diagnostics": self.last_diagnostics, "images": self.image_counts,
                "student_watch": self.student_watch}

    def load_run_state(self, state: dict[str, Any]) -> None:
        self.collapses = list(state.get("collapses", []))
        self.last_diagnostics = dict(state.get("last_diagnostics", {}))
        self.image_counts = {"synthesised": 0, "distilled": 0, **state.get("images", {})}
        self.student_watch = {**self.student_watch, **state.get("student_watch", {})}

    def count_synthesised(self, n: int) -> None:
        """Count `n` new synthetic images made for the student (summary: ``synthetic_images.synthesised``)."""
        self.image_counts["synthesised"] += int(n)

    # ---- where images come from -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.train_cfg.batch_size

    @torch.no_grad()
    def produce(self, n: int) -> torch.Tensor:
        """``n`` synthetic images without gradients, in the generator's current mode."""
        assert self.generator is not None
        return self.generator(self.generator.noise(n))

    def remember(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """A generator step's batch (and the teacher's logits on it), for the student's next steps."""
        self._latest = (x.detach(), logits.detach())
        self.count_synthesised(len(x))
        if self.bank is not None:
            self.bank.add(x, logits)

    @torch.no_grad()
    def update_ema(self) -> None:
        """G_ema <- m G_ema + (1 - m) G for the weights; BatchNorm statistics likewise (counts copied)."""
        assert self.generator is not None and self.generator_ema is not None
        m = self.opts.generator_ema
        for e, g in zip(self.generator_ema.parameters(), self.generator.parameters()):
            e.lerp_(g, 1 - m)
        for e, g in zip(self.generator_ema.buffers(), self.generator.buffers()):
            if e.is_floating_point():
                e.lerp_(g, 1 - m)
            else:
                e.copy_(g)

    @property
    def ema_count(self) -> int:
        """Images of each student batch that come from the EMA generator (half with ``generator_ema``)."""
        return self.batch_size // 2 if self.generator_ema is not None else 0

    def student_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, teacher logits) for one student step; with ``generator_ema`` its last half is fresh images of
        the EMA generator (in the generator's current BatchNorm mode)."""
        x, t = self._usual_batch(self.batch_size - self.ema_count)
        if not self.ema_count:
            return x, t
        assert self.generator is not None and self.generator_ema is not None
        xe = self.generator_ema.sample(self.ema_count, batch_stats=self.generator.training)
        self.count_synthesised(len(xe))
        return torch.cat([x, xe]), torch.cat([t, self.teacher_forward(xe)])

    def _usual_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.student_data == "fresh" and (self.bank is None or len(self.bank) == 0
                                             or int(self.student_step_count) % self.opts.sample_every == 0):
            x = self.produce(n if self.bank is None else self.batch_size)
            self.count_synthesised(len(x))
            t = self.teacher_forward(x)
            if self.bank is None:
                return x, t
            self.bank.add(x, t)
        if self.bank is not None and len(self.bank) > 0:
            return self.bank.draw(n)
        if self._latest is None:  # a joint schedule's student step before any generator step
            x = self.produce(self.batch_size)
            self.count_synthesised(len(x))
            self._latest = (x, self.teacher_forward(x))
        return self._latest[0][:n], self._latest[1][:n]

    # ---- the student ------------------------------------------------------------------------
    def distill_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kd": kd_loss(s_logits, t_logits, self.opts.temperature)}

    def student_step(self, batch: Any) -> dict[str, torch.Tensor]:
        x, t = self.student_batch()
        self.student_step_count += 1
        self.image_counts["distilled"] += len(x)
        return self.distill_loss(self.student(x), t)

    def student_update(self, repeat: int = 1) -> Update:
        return Update("student", list(self.student.parameters()), self.student_step, repeat=repeat)

    def generator_update(self, loss: Any) -> Update:
        assert self.generator is not None
        return Update("generator", list(self.generator.parameters()), loss,
                      optimizer=constant_adam(self.opts.generator_lr),
                      after_step=self.update_ema if self.generator_ema is not None else None)

    def generated_stage(self, name: str, updates: list[Update], epochs: int, train: list[nn.Module],
                        diagnose: bool = True, **kw: Any) -> Stage:
        """A stage that reads no data: ``steps_per_epoch`` steps per epoch, diagnostics after each."""
        return Stage(name, updates, epochs, train_modules=train, data=None, steps_per_epoch=self.opts.steps_per_epoch,
                     on_epoch_end=(lambda e: self.diagnose(name, e)) if diagnose else None, **kw)

    # ---- diagnostics ------------------------------------------------------------------------
    @torch.no_grad()
    def diagnostic_images(self, n: int) -> torch.Tensor:
        """The images the diagnostics look at: as the student sees them (the generator's batch statistics
        in joint schedules, without touching its running statistics)."""
        assert self.generator is not None
        return self.generator.sample(n, batch_stats=self.generator.training or self.student_data != "fresh")

    def diagnose(self, stage: str, epoch: int) -> dict[str, Any]:
        o = self.opts
        x = self.diagnostic_images(o.diagnostics_samples)
        logits = self.teacher_forward(x)
        d = inspect_samples(x, logits, max_class_fraction=collapse_threshold(o.collapse_class_fraction,
                                                                               self.info.num_classes),
                            min_diversity=o.collapse_min_diversity)
        self._diagnostics_before = self.last_diagnostics
        self.last_diagnostics = {"stage": stage, "epoch": epoch + 1, **d}
        if self.run_dir is not None and o.grid_images:
            shown = x[:o.grid_images]
            save_grid(Path(self.run_dir) / "samples" / f"{stage}_epoch{epoch + 1:03d}.png", shown, self.info.mean,
                      self.info.std, [self.info.classes[int(c)] for c in logits[:len(shown)].argmax(1)])
        record: dict[str, Any] = {f"gen/{k}": d[k] for k in ("class_entropy", "class_max_fraction", "diversity",
                                                             "class_histogram")}
        record["gen/collapse"] = float(bool(d["collapse"]))
        record.update({f"images/{k}": v for k, v in self.image_counts.items()})
        if d["collapse"]:
            record["gen/collapse_reasons"] = d["collapse"]
        record.update(self.watch_student(stage, epoch, x, logits))
        if d["collapse"]:
            self._handle_collapse(stage, epoch, d["collapse"])
        return record

    @torch.no_grad()
    def watch_student(self, stage: str, epoch: int, x: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, Any]:
        """The student on the diagnostic images: its top-1 agreement with the teacher and how many classes it
        gives (``student/agreement``, ``student/classes`` in metrics.jsonl). A data-free run has no labelled
        image to show that its student is not learning, so when the student gives one class to every image for
        :attr:`STUCK_EPOCHS` epochs in a row in which it trained, while the teacher gives several, the run
        warns once and records it (summary ``student_stuck``): seen on MNIST with FastDFKD, a student whose
        units died in its first steps at learning rate 0.2 and never moved again."""
        was_training = self.student.training
        self.student.eval()
        pred = self.student(x).argmax(1)
        self.student.train(was_training)
        teacher_pred = teacher_logits.argmax(1)
        classes, teacher_classes = pred.unique().numel(), teacher_pred.unique().numel()
        w = self.student_watch
        distilled = self.image_counts["distilled"]
        if distilled > w["distilled"]:  # only epochs in which the student trained count (not an inversion phase)
            single = classes == 1 and teacher_classes > 1
            w["single_class_epochs"] = w["single_class_epochs"] + 1 if single else 0
        w["distilled"] = distilled
        if w["single_class_epochs"] >= self.STUCK_EPOCHS and w["stuck"] is None:
            w["stuck"] = {"stage": stage, "epoch": epoch + 1, "class": int(pred[0]),
                          "epochs": w["single_class_epochs"]}
            warn(f"{self.run_dir or 'this run'}: [{stage}] epoch {epoch + 1}: the student is not learning: it has "
                 f"given class {w['stuck']['class']} to every generated image for {w['single_class_epochs']} "
                 f"epochs while the teacher gives {teacher_classes} classes; its units may have died in its "
                 f"first steps: lower train.lr, set train.warmup_epochs, or change the seed")
        return {"student/agreement": float((pred == teacher_pred).float().mean()), "student/classes": classes}

    def _handle_collapse(self, stage: str, epoch: int, reasons: list[str]) -> None:
        """Record a collapse, act on it as ``on_collapse`` says, and warn with what was done."""
        o = self.opts
        event: dict[str, Any] = {"stage": stage, "epoch": epoch + 1, "reasons": reasons}
        trains_generator = self.trains_generator()
        restarts = sum(1 for e in self.collapses if e.get("action", "").startswith("generator re-initialised"))
        msg = f"{self.run_dir or 'this run'}: [{stage}] epoch {epoch + 1}: the generated images collapsed " \
              f"({'; '.join(reasons)})"
        action = o.on_collapse
        if action == "restart" and not trains_generator:
            action = "continue"
            msg += "; this stage does not train the generator, so it cannot be re-initialised"
        elif action == "restart" and restarts >= o.collapse_restarts:
            action = "stop"
            msg += f"; it was re-initialised {restarts} time(s) already (method.collapse_restarts)"
        if action == "restart":
            assert self.generator is not None
            self.generator.reset()
            if self.generator_ema is not None:  # the average of a collapsed generator is no better
                self.generator_ema.load_state_dict(self.generator.state_dict())
            if self.forget_optimizer_state is not None:  # stale Adam moments would steer the new generator
                self.forget_optimizer_state(list(self.generator.parameters()))
            if self.bank is not None:
                self.bank.clear()
            self._latest = None
            event["action"] = "generator re-initialised (method.on_collapse=restart)"
            msg += "; the generator was re-initialised (method.on_collapse=restart)"
        elif action == "stop":
            event["action"] = "training stopped"
            self.stop_request = f"generator collapse at {stage} epoch {epoch + 1}"
            self.stop_discards_epoch = True
            msg += ("; training stops here, and the student and generator are put back as they were before this "
                    "epoch (it trained on collapsed images); try a lower method.generator_lr")
        else:
            event["action"] = "none"
            msg += ("; a collapsed generator teaches the student nothing: set method.on_collapse=restart or stop, "
                    "or lower method.generator_lr")
        self.collapses.append(event)
        warn(msg)

    def may_discard_epoch(self) -> bool:
        return self.opts.on_collapse != "continue"  # restart turns into stop after collapse_restarts

    def on_epoch_discarded(self) -> None:
        """The collapsed epoch was undone: the kept generator is the one before it, and so are its diagnostics."""
        self.last_diagnostics = self._diagnostics_before
        if self.collapses and self.collapses[-1].get("action") == "training stopped":
            self.collapses[-1]["action"] = "training stopped, the collapsed epoch discarded"

    def trains_generator(self) -> bool:
        """Whether the current stage trains the generator (so that a collapse can restart it)."""
        return self.generator is not None and self.generator.training

    def card_fields(self) -> dict[str, Any]:
        return {"generator_collapse": {"events": len(self.collapses), "handling": self.opts.on_collapse,
                                       "collapsed_at_end": bool(self.last_diagnostics.get("collapse")),
                                       "actions": sorted({e.get("action", "") for e in self.collapses})},
                "student_stuck": self.student_watch["stuck"]}

    # ---- results ----------------------------------------------------------------------------
    def finish(self) -> None:
        super().finish()
        if self.run_dir is not None and self.generator is not None:
            save_generator(Path(self.run_dir) / "generator.pt", self.generator,
                           {"method": self.name, "mean": self.info.mean, "std": self.info.std,
                            "classes": self.info.classes, "batch_stats": self.samples_with_batch_stats()})

    def samples_with_batch_stats(self) -> bool:
        """Whether the saved generator's images are made with batch statistics (joint schedules train it so)."""
        return self.student_data != "fresh"

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"collapse_events": self.collapses, "final_diagnostics": self.last_diagnostics,
                               "collapsed_at_end": bool(self.last_diagnostics.get("collapse")),
                               "synthetic_images": dict(self.image_counts),
                               "student_stuck": self.student_watch["stuck"]}
        if self.generator is not None:
            out["generator_params"] = sum(p.numel() for p in self.generator.parameters())
            if self.run_dir is not None:
                out["generator_file"] = "generator.pt"
        return out
