"""How several named losses become one objective.

A weighting takes any mapping ``{name: scalar loss}`` (distillation paths here, but equally segmentation
or detection terms) and returns one scalar. Each loss ``L_i`` has a hand-given prior weight ``w_i``
(default 1) and a multiplier ``m_i`` chosen by the strategy; the *effective weight* ``m_i * w_i`` is what
:meth:`LossWeighting.effective_weights` reports.

* ``equal``:       L = sum_i L_i                                          (priors ignored)
* ``fixed``:       L = sum_i w_i L_i
* ``uncertainty``: L = sum_i exp(-s_i) w_i L_i + sum_i s_i, with learnable s_i (init 0) trained with the
  model. The rule of Chennupati et al., "Adaptive Distillation: Aggregating Knowledge from Multiple Paths
  for Efficient Distillation" (BMVC 2021), after Kendall et al. (CVPR 2018). At the optimum
  exp(-s_i) = 1 / (w_i L_i): paths with a large loss are weighted down.
* ``gradnorm``:    L = sum_i g_i w_i L_i (Chen et al., "GradNorm", ICML 2018). After each step the g_i move
  so that the gradient norms G_i = ||grad_W g_i w_i L_i|| on shared weights W approach
  mean(G) * r_i^alpha, r_i = (L_i(t)/L_i(0)) / mean_j(L_j(t)/L_j(0)) (slower-learning losses get more
  weight), by gradient descent on sum_i |G_i - target_i|; then sum_i g_i = number of losses. The descent
  is on u_i = log g_i with the gradient taken relative to mean(g G): the same objective, but steps are
  relative (g stays positive, and the learning rate does not depend on the losses' scale, which with
  plain steps on g made the weights of very unequal losses oscillate). One consequence: a weight whose share of
  mean(g G) has become tiny moves by a tiny step, slower than the renormalisation lowers it, so it keeps falling
  (1e-10 in detection, where the paper's rule would hold it near its target; BENCHMARKS.md, issue 21's section,
  and benchmarks/gradnorm_replay.py). ``rule = "adam"`` takes the paper's rule instead, as its common
  implementations do: Adam steps (betas 0.9, 0.999) on g itself with the gradient sign_i G_i, then g clamped
  at 0 and renormalised. The norms G_i cost one backward pass
  per loss down to W; ``every = k`` makes the step on g every k-th training step only (k = 1, the paper's
  rule, updates at every step), which divides that cost by k. Each epoch's mean G_i (before g) and r_i are
  reported by :meth:`GradNormWeighting.epoch_stats`.
* ``normalized``:  L = sum_i w_i L_i / sg(Lbar_i), Lbar_i the running mean of L_i (decay 0.99, the first
  value at the start): every term's value is about w_i, so its gradient no longer carries the constants that
  make one loss larger than another by accident (T^2, a feature map's size, the number of paths): the
  gradient of L_i / Lbar_i is the relative change of L_i.
* ``dwa``:         L = sum_i lambda_i w_i L_i (Liu et al., "End-to-End Multi-Task Learning with Attention",
  CVPR 2019): lambda_i(t) = K exp(r_i / T) / sum_j exp(r_j / T), r_i = Lbar_i(t-1) / Lbar_i(t-2) from the
  mean losses of the two previous epochs; lambda = 1 for the first two epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.adam import adam

from .errors import ConfigError

WEIGHTINGS = ("equal", "fixed", "uncertainty", "gradnorm", "dwa", "normalized")
GRADNORM_RULES = ("relative", "adam")


def _all_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over torchrun processes (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


class LossWeighting(nn.Module):
    kind: ClassVar[str] = ""
    uses_priors: ClassVar[bool] = True

    def __init__(self, names: Sequence[str], priors: Mapping[str, float] | None = None):
        super().__init__()
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"weighting needs distinct loss names, got {list(names)}")
        self.names = list(names)
        priors = dict(priors or {})
        unknown = sorted(set(priors) - set(self.names))
        if unknown:
            raise ConfigError(f"weights given for unknown losses {unknown}; losses: {self.names}")
        w = [float(priors.get(n, 1.0)) if self.uses_priors else 1.0 for n in self.names]
        self.register_buffer("prior", torch.tensor(w))

    def stack(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in losses]
        if missing or len(losses) != len(self.names):
            extra = sorted(set(losses) - set(self.names))
            raise ValueError(f"weighting expected losses {self.names}; missing {missing}, unexpected {extra}")
        return torch.stack([losses[n].float().reshape(()) for n in self.names])

    def multipliers(self) -> torch.Tensor:
        return torch.ones_like(self.prior)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (self.multipliers() * self.prior * self.stack(losses)).sum()

    def effective_weights(self) -> dict[str, float]:
        w = (self.multipliers().detach() * self.prior).tolist()
        return dict(zip(self.names, w))

    def end_epoch(self) -> None:
        """Called once per epoch, after the last step (DWA updates here)."""

    def epoch_stats(self) -> dict[str, float]:
        """What the strategy measured during the epoch, for ``metrics.jsonl`` (read once per epoch, then reset)."""
        return {}

    def param_groups(self) -> list[dict]:
        """Parameters to train with the model (no weight decay on them)."""
        params = [p for p in self.parameters()]
        return [{"params": params, "weight_decay": 0.0}] if params else []


class EqualWeighting(LossWeighting):
    kind = "equal"
    uses_priors = False


class FixedWeighting(LossWeighting):
    kind = "fixed"


class UncertaintyWeighting(LossWeighting):
    kind = "uncertainty"

    def __init__(self, names: Sequence[str], priors: Mapping[str, float] | None = None):
        super().__init__(names, priors)
        self.log_var = nn.Parameter(torch.zeros(len(self.names)))  # s_i

    def multipliers(self) -> torch.Tensor:
        return torch.exp(-self.log_var)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (self.multipliers() * self.prior * self.stack(losses)).sum() + self.log_var.sum()


class NormalizedWeighting(LossWeighting):
    kind = "normalized"
    decay = 0.99

    def __init__(self, names: Sequence[str], priors: Mapping[str, float] | None = None):
        super().__init__(names, priors)
        self.register_buffer("mean", torch.zeros(len(self.names)))  # running mean of each loss
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def multipliers(self) -> torch.Tensor:
        return 1.0 / self.mean.clamp_min(1e-12) if bool(self.started) else torch.ones_like(self.mean)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        stacked = self.stack(losses)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                now = _all_mean(stacked.detach().clone())
                if bool(self.started):
                    self.mean.mul_(self.decay).add_((1 - self.decay) * now)
                else:
                    self.mean.copy_(now)
                    self.started.fill_(True)
        return (self.multipliers() * self.prior * stacked).sum()


class GradNormWeighting(LossWeighting):
    kind = "gradnorm"

    def __init__(self, names: Sequence[str], priors: Mapping[str, float] | None = None, *,
                 shared: Callable[[], list[nn.Parameter]], alpha: float = 1.5, lr: float = 0.025, every: int = 1,
                 rule: str = "relative"):
        super().__init__(names, priors)
        if every < 1:
            raise ConfigError(f"GradNorm's update interval must be at least 1 step, got {every}")
        if rule not in GRADNORM_RULES:
            raise ConfigError(f"GradNorm's update rule must be one of {list(GRADNORM_RULES)}, got {rule!r}")
        self.shared = shared
        self.alpha, self.lr, self.every, self.rule = alpha, lr, every, rule
        self.register_buffer("g", torch.ones(len(self.names)))
        self.register_buffer("initial", torch.zeros(len(self.names)))
        if rule == "adam":  # Adam's moments and step count, saved with the run (absent under the relative rule)
            self.register_buffer("adam_m", torch.zeros(len(self.names)))
            self.register_buffer("adam_v", torch.zeros(len(self.names)))
            self.register_buffer("adam_step", torch.zeros(()))
        if every > 1:  # saved with the run, so a resumed run updates on the same steps (absent when every = 1)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        # the epoch's sums of G_i (before g) and r_i over its updates, for epoch_stats (not in checkpoints: a
        # resumed epoch reports the mean over the steps it ran)
        self.register_buffer("norm_sums", torch.zeros(len(self.names), dtype=torch.float64), persistent=False)
        self.register_buffer("ratio_sums", torch.zeros(len(self.names), dtype=torch.float64), persistent=False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long), persistent=False)

    def multipliers(self) -> torch.Tensor:
        return self.g

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scaled = self.prior * self.stack(losses)
        total = (self.g.clone() * scaled).sum()
        if self.training and torch.is_grad_enabled() and self._due():
            self.step(scaled)
        return total

    def _due(self) -> bool:
        """Whether this training step updates g: every step, or every `every`-th one from the first."""
        if self.every == 1:
            return True
        due = int(self.calls) % self.every == 0
        self.calls += 1
        return due

    def gradient_norms(self, scaled: torch.Tensor) -> torch.Tensor:
        """||grad_W w_i L_i|| for each loss, on the shared weights W."""
        params = [p for p in self.shared() if p.requires_grad]
        if not params:
            raise ValueError("GradNorm needs trainable shared weights (see method.gradnorm_layer)")
        norms = []
        for i in range(len(self.names)):
            if not scaled[i].requires_grad:
                norms.append(scaled.new_zeros(()))
                continue
            grads = torch.autograd.grad(scaled[i], params, retain_graph=True, allow_unused=True)
            squares = [(g.float() ** 2).sum() for g in grads if g is not None]
            norms.append(torch.stack(squares).sum().sqrt() if squares else scaled.new_zeros(()))
        return torch.stack(norms).detach()

    @torch.no_grad()
    def update(self, losses: torch.Tensor, norms: torch.Tensor) -> None:
        """One GradNorm step on g from the current (prior-scaled) losses and their gradient norms."""
        losses = losses.detach().float()
        if not bool((self.initial > 0).all()):
            self.initial.copy_(losses.clamp_min(1e-12))
        ratio = losses / self.initial
        r = ratio / ratio.mean().clamp_min(1e-12)
        weighted = self.g * norms
        target = weighted.mean() * r.pow(self.alpha)
        if self.rule == "relative":
            # gradient of sum_j |g_j G_j - target_j| with respect to u_i = log g_i, relative to mean(g G)
            grad = _all_mean(torch.sign(weighted - target) * weighted / weighted.mean().clamp_min(1e-12))
            self.g.mul_(torch.exp(-self.lr * grad))
        else:  # its gradient with respect to g_i itself, sign_i G_i, taken by Adam; a weight stays >= 0
            grad = _all_mean(torch.sign(weighted - target) * norms)
            adam([self.g], [grad], [self.adam_m], [self.adam_v], [], [self.adam_step], amsgrad=False, beta1=0.9,
                 beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8, maximize=False)
            self.g.clamp_(min=0.0)
        self.g.mul_(len(self.names) / self.g.sum().clamp_min(1e-12))
        self.norm_sums += norms.double()
        self.ratio_sums += r.double()
        self.updates += 1

    def epoch_stats(self) -> dict[str, float]:
        """Means over the epoch's updates of each loss's gradient norm on W before g (``gradnorm/grad/<name>``,
        ||grad_W w_i L_i||) and of its relative inverse training rate (``gradnorm/r/<name>``): the two inputs
        of GradNorm's target, so a weight that runs away can be traced to the norms or to the rates."""
        n = int(self.updates)
        if n == 0:
            return {}
        norms, ratios = (self.norm_sums / n).tolist(), (self.ratio_sums / n).tolist()
        self.norm_sums.zero_()
        self.ratio_sums.zero_()
        self.updates.zero_()
        return {**{f"gradnorm/grad/{k}": v for k, v in zip(self.names, norms)},
                **{f"gradnorm/r/{k}": v for k, v in zip(self.names, ratios)}}

    def step(self, scaled: torch.Tensor) -> None:
        with torch.enable_grad():
            norms = self.gradient_norms(scaled)
        self.update(scaled, norms)


class DWAWeighting(LossWeighting):
    kind = "dwa"

    def __init__(self, names: Sequence[str], priors: Mapping[str, float] | None = None, *, temperature: float = 2.0):
        super().__init__(names, priors)
        self.temperature = temperature
        k = len(self.names)
        self.register_buffer("lam", torch.ones(k))
        self.register_buffer("sums", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("history", torch.full((2, k), float("nan"), dtype=torch.float64))  # t-2, t-1

    def multipliers(self) -> torch.Tensor:
        return self.lam

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        stacked = self.stack(losses)
        if self.training:
            self.sums += stacked.detach().double()
            self.count += 1
        return (self.lam * self.prior * stacked).sum()

    @torch.no_grad()
    def end_epoch(self) -> None:
        if self.count <= 0:
            return
        mean = _all_mean(self.sums / self.count)
        self.history[0] = self.history[1]
        self.history[1] = mean
        self.sums.zero_()
        self.count.zero_()
        if bool(torch.isfinite(self.history).all()):
            self.lam.copy_(dwa_weights(self.history[1], self.history[0], self.temperature).float())


def dwa_weights(last: torch.Tensor, before: torch.Tensor, temperature: float) -> torch.Tensor:
    """lambda_i = K softmax_i( (L_i(t-1) / L_i(t-2)) / T )."""
    r = last / before.clamp_min(1e-12)
    return len(r) * torch.softmax(r / temperature, dim=0)


def make_weighting(kind: str, names: Sequence[str], priors: Mapping[str, float] | None = None, *,
                   shared: Callable[[], list[nn.Parameter]] | None = None, gradnorm_alpha: float = 1.5,
                   gradnorm_lr: float = 0.025, gradnorm_every: int = 1, gradnorm_rule: str = "relative",
                   dwa_temperature: float = 2.0) -> LossWeighting:
    if kind == "equal":
        return EqualWeighting(names, priors)
    if kind == "fixed":
        return FixedWeighting(names, priors)
    if kind == "uncertainty":
        return UncertaintyWeighting(names, priors)
    if kind == "gradnorm":
        if shared is None:
            raise ConfigError("gradnorm weighting needs the shared weights W (method.gradnorm_layer)")
        return GradNormWeighting(names, priors, shared=shared, alpha=gradnorm_alpha, lr=gradnorm_lr,
                                 every=gradnorm_every, rule=gradnorm_rule)
    if kind == "dwa":
        return DWAWeighting(names, priors, temperature=dwa_temperature)
    if kind == "normalized":
        return NormalizedWeighting(names, priors)
    raise ConfigError(f"unknown weighting {kind!r}; choose one of {', '.join(WEIGHTINGS)}")
