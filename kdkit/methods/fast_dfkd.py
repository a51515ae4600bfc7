"""FastDFKD (Fang, Mo, Wang, Song, Bei & Song, "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022).

Synthesis is fast because it starts from a meta-learned generator that already holds the features common to all
syntheses: each synthesis copies the meta generator G_meta into a fast generator G_fast, draws latent codes z and
targets y, and takes a few Adam steps (``synthesis_steps``, the authors' 2 on CIFAR) on G_fast and z:

    x~ = aug(G_fast(z))                                         (random crop with padding, horizontal flip)
    L_syn = bn_weight * R_bn(x~) + ce_weight * CE(f_t(x~), y) + adv_weight * L_adv(x~)
    L_adv = - mean_i( KL(p_t(x~_i) || p_s(x~_i)) * [argmax p_s(x~_i) = argmax p_t(x~_i)] )   (from synthesis `warmup`)

R_bn matches the teacher's BatchNorm running statistics with the batch's, blended with a running average of
earlier syntheses' statistics (``bn_momentum``). The meta generator then takes one step so that few steps suffice
next time (``meta``): ``fomaml`` (the authors' default: the sum of G_fast's gradients over the steps, one Adam step
at ``generator_lr * synthesis_steps``, betas (0.5, 0.999)) or ``reptile`` (gradient (G_meta - G_fast) * 67);
``none`` keeps G_meta as it is (the paper's "w/o meta" ablation uses a plain generator). Each synthesis adds its
lowest-loss batch (scored before each step) to a memory that only grows (``pool_size`` 0: keep every image).
After ``warmup`` syntheses without training, each epoch makes one synthesis and the student then takes
``steps_per_epoch`` steps of T^2 KL(p_t^T || p_s^T) on augmented batches drawn from the memory, the teacher's
logits computed on the same augmented batch.

Defaults are the authors' CIFAR settings (scripts/fast_cifar.sh of zju-vipa/Fast-Datafree, WRN teachers: T 20,
400 student steps per synthesis, z of 256, generator width 64, 2 steps at lr 5e-3 for G and 0.015 for z, bn 10,
oh 0.4, adv 1.1, warm-up 20 syntheses, bn momentum 0.9, the first layer re-initialised at synthesis 120 + warm-up;
the student: SGD 0.2, momentum 0.9, weight decay 1e-4, cosine over 200 epochs, batch 256). The teacher needs
BatchNorm layers for R_bn; on a teacher without them set ``method.bn_weight=0`` (then only CE and the adversarial
term shape the images, which the paper does not evaluate).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import Augment
from ..errors import ModelError
from ..generators import FastGenerator
from ..losses.datafree import BNStatistics
from ..schema import opt
from . import register
from .base import Stage
from .datafree import DataFree, DataFreeOptions, ReplayBank


@dataclass
class FastDFKDOptions(DataFreeOptions):
    temperature: float = opt(20.0, "temperature T of the student's KD loss (the authors' 20)", gt=0)
    steps_per_epoch: int = opt(400, "student steps per synthesis, one synthesis an epoch (the authors' 400)", gt=0)
    latent_dim: int = opt(256, "dimension of the latent codes z", gt=0)
    generator_width: int = opt(64, "the generator's width (ngf; its middle layers have 2x, the authors' 64)", ge=1)
    generator_lr: float = opt(5e-3, "Adam learning rate of the fast generator (lr_g)", gt=0)
    latent_lr: float = opt(0.015, "Adam learning rate of the latent codes (lr_z)", gt=0)
    synthesis_steps: int = opt(2, "optimisation steps per synthesis (g_steps)", ge=1)
    bn_weight: float = opt(10.0, "weight of the BatchNorm-statistics loss (0: a teacher without BatchNorm)", ge=0)
    ce_weight: float = opt(0.4, "weight of the teacher's cross-entropy on the random targets (oh)", ge=0)
    adv_weight: float = opt(1.1, "weight of the adversarial term (adv)", ge=0)
    warmup: int = opt(20, "syntheses made before the student's first step, the adversarial term joining at the "
                          "last of them (the authors' warm-up: 20 epochs of synthesis only)", ge=0)
    bn_momentum: float = opt(0.9, "blend of earlier syntheses' BatchNorm statistics into R_bn (bn_mmt)", ge=0, lt=1)
    meta: Literal["fomaml", "reptile", "none"] = opt("fomaml", "how the meta generator learns its initialisation")
    reptile_scale: float = opt(67.0, "meta=reptile: the gradient is (meta - fast) times this (the authors' 67)", gt=0)
    reset_first_layer: bool = opt(True, "re-initialise the generator's first layer once, at synthesis 120 + "
                                        "warmup (the authors' reset_l0)")
    crop_padding: int = opt(4, "augmentation of synthesised images: random crop with this padding", ge=0)
    hflip: bool = opt(True, "augmentation: random horizontal flips (the authors'; off for digits)")
    pool_size: int = opt(0, "the memory of synthesised images; 0: every image (the authors')", ge=0)
    on_collapse: Literal["continue", "restart", "stop"] = opt(
        "continue", "when the newest synthesised images collapse (one class, or no diversity): only warn "
        "('continue': early syntheses of a few steps often are one class, and the memory keeps the earlier "
        "ones), re-initialise the meta generator ('restart'), or end training with the model of the epoch before "
        "('stop')")


@register
class FastDFKD(DataFree):
    name = "fast_dfkd"
    Options = FastDFKDOptions
    student_data = "fresh"

    def __init__(self, opts: Any, **kw: Any):
        super().__init__(opts, **kw)
        self.generator = FastGenerator(self.info.input_shape, opts.latent_dim, opts.generator_width,  # type: ignore
                                       self.info.mean, self.info.std)
        self.bn = BNStatistics(self.teacher, opts.bn_momentum)
        if not self.bn.layers and opts.bn_weight > 0:
            self.bn.remove()
            raise ModelError(
                f"method fast_dfkd matches the teacher's BatchNorm statistics, and this {type(self.teacher).__name__} "
                "teacher has no BatchNorm layer; set method.bn_weight=0 to synthesise from the cross-entropy and "
                "adversarial terms only (not evaluated by the paper), or use rdskd, dafl or dfad")
        self.bn.enabled = False
        capacity = opts.pool_size or (opts.warmup + self.train_cfg.epochs) * self.batch_size
        self.pool = ReplayBank(capacity)
        self.augment = Augment(opts.crop_padding, opts.hflip)
        self.register_buffer("syntheses", torch.zeros((), dtype=torch.long))
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(),
                                               lr=opts.generator_lr * opts.synthesis_steps, betas=(0.5, 0.999))
        self.last_synthesis: dict[str, float] = {}

    # ---- state kept across a resume besides the module's buffers ------------------------------
    def run_state(self) -> dict[str, Any]:
        return {**super().run_state(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "bn_momentum": self.bn.mmt}

    def load_run_state(self, state: dict[str, Any]) -> None:
        super().load_run_state(state)
        if "meta_optimizer" in state:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.bn.mmt = state.get("bn_momentum")

    # ---- synthesis ----------------------------------------------------------------------------
    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop and flip of normalised images, as the authors' kornia pipeline does on [0, 1] images
        before normalising (padding with black)."""
        if not self.augment.active:
            return x
        assert self.generator is not None
        mean, std = self.generator.mean, self.generator.std
        params = self.augment.sample(len(x), torch.default_generator)
        return (self.augment.apply(x * std + mean, params) - mean) / std

    def synthesize(self) -> dict[str, float]:
        """One synthesis: a few steps of a fast copy of the meta generator and its latent codes, the meta step,
        and the lowest-loss batch into the memory."""
        o, meta = self.opts, self.generator
        assert meta is not None
        self.syntheses += 1
        n = int(self.syntheses)
        if o.reset_first_layer and n == 120 + o.warmup:
            nn.init.normal_(meta.l1.weight, 0.0, 0.02)
            nn.init.constant_(meta.l1.bias, 0.0)
        device = meta.mean.device
        fast = copy.deepcopy(meta).train()
        for p in fast.parameters():  # the engine freezes what no update trains, the meta generator included
            p.requires_grad_(True)
        z = torch.randn(self.batch_size, o.latent_dim, device=device, requires_grad=True)
        y = torch.randint(0, self.info.num_classes, (self.batch_size,), device=device)
        opt_fast = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": o.latent_lr}],
                                    lr=o.generator_lr, betas=(0.5, 0.999))
        student_was = self.student.training
        self.student.eval()
        frozen = [p for p in self.student.parameters() if p.requires_grad]
        for p in frozen:  # the adversarial term shapes the images, never the student's gradients
            p.requires_grad_(False)
        best_cost, best, terms = float("inf"), None, {}
        self.meta_optimizer.zero_grad(set_to_none=False)
        try:
            for _ in range(o.synthesis_steps):
                x = fast(z)
                xa = self._augmented(x)
                self.bn.clear()
                self.bn.enabled = o.bn_weight > 0
                t_out = self.teacher(xa)
                self.bn.enabled = False
                terms = {"ce": F.cross_entropy(t_out, y)}
                loss = o.ce_weight * terms["ce"]
                if o.bn_weight > 0:
                    terms["bn"] = self.bn.loss
                    loss = loss + o.bn_weight * terms["bn"]
                if o.adv_weight > 0 and n >= o.warmup:
                    s_out = self.student(xa)
                    agree = (s_out.argmax(1) == t_out.argmax(1)).float()
                    kl = F.kl_div(F.log_softmax(s_out, 1), F.softmax(t_out, 1), reduction="none").sum(1)
                    terms["adv"] = -(kl * agree).mean()
                    loss = loss + o.adv_weight * terms["adv"]
                if float(loss.detach()) < best_cost or best is None:  # scored before this step, as the authors do
                    best_cost, best = float(loss.detach()), x.detach()
                opt_fast.zero_grad()
                loss.backward()
                if o.meta == "fomaml":  # the fast generator's gradients summed into the meta generator's
                    for p, q in zip(meta.parameters(), fast.parameters()):
                        if q.grad is not None:
                            p.grad = q.grad.clone() if p.grad is None else p.grad + q.grad
                opt_fast.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.student.train(student_was)
        if o.meta == "reptile":
            for p, q in zip(meta.parameters(), fast.parameters()):
                p.grad = (p.detach() - q.detach()) * o.reptile_scale
        if o.meta != "none":
            self.meta_optimizer.step()
        meta.zero_grad(set_to_none=True)
        if o.bn_weight > 0 and o.bn_momentum > 0:
            self.bn.update_momentum()
        assert best is not None
        self.pool.add(best, best.new_zeros(len(best), 0))
        self.count_synthesised(len(best))
        terms_out = {f"synthesis_{k}": float(torch.as_tensor(v).detach()) for k, v in terms.items()}
        self.last_synthesis = {"synthesis_loss": best_cost, **terms_out}
        return self.last_synthesis

    # ---- the student ----------------------------------------------------------------------------
    def student_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if int(self.student_step_count) % self.opts.steps_per_epoch == 0 or len(self.pool) == 0:
            while int(self.syntheses) < self.opts.warmup:  # the warm-up: syntheses only, before the first step
                self.synthesize()
            self.synthesize()
        x = self._augmented(self.pool.draw(self.batch_size)[0])
        return x, self.teacher_forward(x)

    def stages(self) -> list[Stage]:
        stage = self.generated_stage("distill", [self.student_update()], self.train_cfg.epochs, [self.student])
        diagnose = stage.on_epoch_end

        def end_epoch(epoch: int) -> dict[str, Any]:
            return {**(diagnose(epoch) if diagnose is not None else {}), **self.last_synthesis,
                    "pool_images": len(self.pool)}

        stage.on_epoch_end = end_epoch
        return [stage]

    # ---- diagnostics and results ----------------------------------------------------------------
    @torch.no_grad()
    def diagnostic_images(self, n: int) -> torch.Tensor:
        """The newest synthesised images (the last syntheses' batches): what the generator makes now, the images
        the student learns from next (the meta generator's own samples are only starting points)."""
        if len(self.pool) == 0:
            assert self.generator is not None
            return self.generator.sample(n, batch_stats=True)
        return self.pool.newest(n)

    def trains_generator(self) -> bool:
        return True  # every synthesis trains a copy and steps the meta generator

    def samples_with_batch_stats(self) -> bool:
        return True  # the meta generator never runs itself: its copies make images with their batch statistics

    def _handle_collapse(self, stage: str, epoch: int, reasons: list[str]) -> None:
        restarts = len(self.collapses)
        super()._handle_collapse(stage, epoch, reasons)
        if len(self.collapses) > restarts and self.collapses[-1].get("action", "").startswith("generator re-init"):
            self.meta_optimizer.state.clear()  # stale moments would steer the new meta generator

    def finish(self) -> None:
        super().finish()
        self.bn.remove()

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "syntheses": int(self.syntheses), "pool_images": len(self.pool)}
