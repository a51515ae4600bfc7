"""DeepInversion: Dreaming to Distill (Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha & Kautz, CVPR 2020).

Images are synthesised by optimising the input pixels themselves, batch after batch, so that the frozen
teacher classifies them as chosen target classes y (cycled 0, 1, ..., K-1) and every BatchNorm layer sees
batch statistics equal to its running ones:

    min_x  CE(f_t(x~), y) + w_bn R_bn(x~) + w_tv R_TV(x~) + w_l2 ||x~||_2 + w_comp R_comp(x~)

with x~ a random jitter (roll by up to ``jitter`` pixels) of x,
``R_bn = sum_l ||mu_l(x~) - mu_l^run||_2 + ||var_l(x~) - var_l^run||_2``, ``R_TV`` the L2 total variation
and, for Adaptive DeepInversion (``competition_weight > 0``), a competition term that pushes images on which
the student already agrees with the teacher to where it does not (the student then trains along, on the
batches made so far):

* ``competition: authors`` (default): the authors' code, ``R_comp = 1 - clamp((KL(M||P) + KL(M||Q)) / 2, 0, 1)``
  with P, Q the student's and teacher's softmax at T, M = (P + Q) / 2, and P, Q, M each clamped to
  [0.01, 0.99] (not renormalised) before the KLs;
* ``competition: js``: ``R_comp = 1 - clamp(JS(P, Q), 0, 1)``, the true Jensen-Shannon divergence the paper
  writes (JS = (KL(P||M) + KL(Q||M)) / 2).

Each batch keeps its last iterate (``keep: last``): the authors' CIFAR-10 code records a "best" iterate as
``inputs.data``, which shares storage with the optimised images and so holds the last one; ``keep: best``
keeps the lowest-loss iterate instead. The student is then distilled on the synthesised set (T^2 KL at
``temperature``; the teacher's logits on the set are computed once).

Defaults are the authors' CIFAR-10 settings (2,000 Adam steps at 0.1 per batch, w_bn 100, w_tv 2.5e-5,
w_l2 0, jitter 2, competition at T = 3). The teacher must have BatchNorm layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.checkpoint import atomic_save
from ..errors import ModelError
from ..losses.datafree import BNStatistics, clamped_mean_kl, js_divergence, total_variation
from ..schema import opt
from . import register
from .base import Stage, Update
from .datafree import DataFree, DataFreeOptions, constant_adam


@dataclass
class DeepInversionOptions(DataFreeOptions):
    temperature: float = opt(4.0, "temperature T of the student's KD loss on the synthesised set", gt=0)
    batches: int = opt(10, "batches of train.batch_size images to synthesise", gt=0)
    iterations: int = opt(2000, "optimisation steps per batch (the authors' 2,000)", gt=0)
    image_lr: float = opt(0.1, "Adam learning rate of the pixels (the authors' 0.1)", gt=0)
    bn_weight: float = opt(100.0, "weight w_bn of the BatchNorm-statistics loss", ge=0)
    tv_weight: float = opt(2.5e-5, "weight w_tv of the L2 total variation", ge=0)
    l2_weight: float = opt(0.0, "weight w_l2 of the images' L2 norm", ge=0)
    jitter: int = opt(2, "random roll of up to this many pixels per step", ge=0)
    competition_weight: float = opt(0.0, "Adaptive DeepInversion: weight of 1 - JS(teacher, student); 0: off", ge=0)
    competition_temperature: float = opt(3.0, "temperature of the competition term", gt=0)
    competition: Literal["authors", "js"] = opt(
        "authors", "competition term: the authors' clamped KL(M||P) + KL(M||Q), or the true Jensen-Shannon divergence")
    keep: Literal["last", "best"] = opt("last", "per batch: the last iterate (what the authors' code keeps) or the "
                                                "lowest-loss one")


@register
class DeepInversion(DataFree):
    name = "deepinversion"
    Options = DeepInversionOptions
    student_data = "generator_batch"

    def __init__(self, opts: Any, **kw: Any):
        super().__init__(opts, **kw)
        self.bn = BNStatistics(self.teacher)
        if not self.bn.layers:
            self.bn.remove()
            raise ModelError(
                f"method deepinversion needs a teacher with BatchNorm layers (it matches their running mean and "
                f"variance), and this {type(self.teacher).__name__} teacher has none; use rdskd, dafl or dfad, or a "
                "teacher with BatchNorm")
        self.bn.enabled = False
        shape = (self.batch_size, *self.info.input_shape)
        self.images = nn.ParameterList([nn.Parameter(torch.randn(shape)) for _ in range(opts.batches)])
        self.register_buffer("best", torch.zeros((opts.batches, *shape)))
        self.register_buffer("best_cost", torch.full((opts.batches,), float("inf")))
        self.register_buffer("done", torch.zeros((), dtype=torch.long))  # batches finished
        self.targets = torch.arange(self.batch_size) % self.info.num_classes
        self._set_logits: torch.Tensor | None = None

    # ---- synthesis --------------------------------------------------------------------------
    def synth_step(self, b: int) -> Any:
        def step(batch: Any) -> dict[str, torch.Tensor]:
            o_ = self.opts
            x = self.images[b]
            j = o_.jitter
            if j:
                dx, dy = (int(v) for v in torch.randint(-j, j + 1, (2,)))
                x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            self.bn.clear()
            self.bn.enabled = True
            o = self.teacher(x)
            self.bn.enabled = False
            terms = {"ce": F.cross_entropy(o, self.targets.to(o.device)), "bn": self.bn.loss,
                     "tv": total_variation(x, "l2"), "l2": torch.linalg.vector_norm(x)}
            loss = terms["ce"] + o_.bn_weight * terms["bn"] + o_.tv_weight * terms["tv"] + o_.l2_weight * terms["l2"]
            if o_.competition_weight > 0:
                t = o_.competition_temperature
                p, q = F.softmax(self.student(x) / t, dim=1), F.softmax(o / t, dim=1)
                div = js_divergence(p, q) if o_.competition == "js" else clamped_mean_kl(p, q)
                terms["competition"] = 1.0 - div.clamp(0.0, 1.0)
                loss = loss + o_.competition_weight * terms["competition"]
            cost = float(loss.detach())
            if o_.keep == "best" and cost < float(self.best_cost[b]):  # scored: the iterate before this step
                self.best_cost[b] = cost
                self.best[b].copy_(self.images[b].detach())
            return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}

        return step

    def synthesised(self) -> torch.Tensor:
        """The finished batches (their kept iterates), one tensor."""
        return self.best[: int(self.done)].flatten(0, 1)

    def student_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.synthesised()
        if self._set_logits is None or len(self._set_logits) != len(images):
            self._set_logits = torch.cat([self.teacher_forward(c) for c in images.split(512)])
        idx = torch.randint(len(images), (self.batch_size,)).to(images.device)
        return images[idx], self._set_logits[idx]

    @torch.no_grad()
    def _finish_batch(self, b: int) -> None:
        if self.opts.keep == "last":
            self.best[b].copy_(self.images[b].detach())
        self.done.fill_(b + 1)
        self.count_synthesised(len(self.best[b]))

    def stages(self) -> list[Stage]:
        o = self.opts
        out = []
        for b in range(o.batches):
            updates = [Update("images", [self.images[b]], self.synth_step(b), optimizer=constant_adam(o.image_lr))]
            train: list[nn.Module] = []
            if o.competition_weight > 0 and b > 0:  # ADI: the student learns along on the batches made so far
                updates.append(self.student_update())
                train = [self.student]
            out.append(Stage(f"synthesise {b + 1}/{o.batches}", updates, 1, train_modules=train, data=None,
                             steps_per_epoch=o.iterations, select="last",
                             on_end=lambda b=b: self._finish_batch(b),
                             on_epoch_end=lambda e, b=b: self.diagnose(f"synthesise{b + 1}", e)))
        out.append(self.generated_stage("distill", [self.student_update()], self.train_cfg.epochs, [self.student]))
        return out

    # ---- diagnostics and results ------------------------------------------------------------
    @torch.no_grad()
    def diagnostic_images(self, n: int) -> torch.Tensor:
        done = int(self.done)
        if done == 0:  # during the first batch: its current best iterate (or its start)
            return (self.best[0] if torch.isfinite(self.best_cost[0]) else self.images[0].detach())[:n]
        images = self.synthesised()
        return images[torch.randperm(len(images))[:n].to(images.device)]

    def finish(self) -> None:
        super().finish()
        self.bn.remove()
        if self.run_dir is not None:
            atomic_save({"format": "kdkit-synthetic", "images": self.synthesised().cpu(), "targets":
                         self.targets.repeat(int(self.done)), "mean": self.info.mean, "std": self.info.std,
                         "classes": self.info.classes}, Path(self.run_dir) / "synthetic.pt")

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "synthetic_images": int(self.done) * self.batch_size,
                "synthetic_file": "synthetic.pt" if self.run_dir is not None else None}
