"""Loss terms of data-free distillation: what a generator (or a synthesised batch) is trained to satisfy.

Notation: ``o`` the teacher's logits on a generated batch, ``p = softmax(o)``, ``pbar`` the batch mean of
``p``, ``x`` the generated images, ``f`` the teacher's features (the classifier's input).

* DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019):
  one-hot ``L_oh = CE(o, argmax o)``, activation ``L_a = -mean|f|``, information entropy
  ``L_ie = sum_k pbar_k log pbar_k`` (the negative entropy of the batch's class mix).
* RDSKD (Han et al., "Robustness and Diversity Seeking Data-Free Knowledge Distillation", ICASSP 2021):
  inter-sample diversity ``L_ds = 1 / (||x_2 - x_1|| / ||p_2 - p_1|| + eps)`` between the batch's two halves,
  and the exponential penalisation ``exp(L - L_ref)`` of a term against a detached reference value.
* DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019): the mean absolute logit difference
  ``L_adv = mean |o_t - o_s|``, maximised by the generator and minimised by the student.
* DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020): the BatchNorm statistics loss
  ``R_bn = sum_l ||mu_l(x) - mu_l^run||_2 + ||var_l(x) - var_l^run||_2``, the image priors (total variation
  and the L2 norm) and, for Adaptive DeepInversion, the competition ``R_comp = 1 - JS(p_t, p_s)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def one_hot_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_oh = CE(o, argmax o): the teacher should be confident on generated images (the target is detached)."""
    return F.cross_entropy(logits, logits.detach().argmax(dim=1))


def information_entropy_loss(logits: torch.Tensor, base: float = math.e) -> torch.Tensor:
    """L_ie = sum_k pbar_k log_base pbar_k: minimised when the batch covers every class equally.

    DAFL's code takes log10 (``base=10``), RDSKD's the natural log; the minimum is -log_base(K)."""
    pbar = F.softmax(logits, dim=1).mean(dim=0)
    return (pbar * torch.log(pbar.clamp_min(1e-30))).sum() / math.log(base)


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """L_a = -mean |f|: generated images should excite the teacher's features strongly (DAFL)."""
    return -features.abs().mean()


def diversity_seeking_loss(images: torch.Tensor, logits: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """L_ds = 1 / (||x_2 - x_1|| / ||p_2 - p_1|| + eps), the two halves of the batch paired in order.

    Generated images that differ little while the teacher's probabilities differ much are penalised:
    the generator is pushed to map distinct noise to distinct images (mode seeking). Norms are Frobenius
    norms over the whole half-batch, as in the authors' code."""
    half = len(images) // 2
    if half == 0:
        raise ValueError("the diversity-seeking loss needs a batch of at least 2 images")
    p = F.softmax(logits, dim=1)
    ratio = torch.linalg.vector_norm(images[half:2 * half] - images[:half]) / torch.linalg.vector_norm(
        p[half:2 * half] - p[:half])
    return 1.0 / (ratio + eps)


def exp_penalty(term: torch.Tensor, reference: torch.Tensor | float) -> torch.Tensor:
    """exp(L - L_ref) with L_ref detached: its gradient is exp(L - L_ref) times the gradient of L, so a term
    that rises above its reference is pushed down ever harder, and one below it gently (RDSKD)."""
    ref = reference.detach() if isinstance(reference, torch.Tensor) else torch.tensor(float(reference))
    return torch.exp(term - ref.to(term))


def l1_logit_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DFAD's model discrepancy: mean_i,k |o_s - o_t|."""
    return (student_logits - teacher_logits).abs().mean()


def _neighbour_differences(x: torch.Tensor) -> list[torch.Tensor]:
    return [x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
            x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:]]


def total_variation(x: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Total variation over the horizontal, vertical and both diagonal neighbour differences d_j:
    ``l2``: sum_j ||d_j||_2 (DeepInversion's R_TV), ``l1``: sum_j mean |d_j|."""
    diffs = _neighbour_differences(x)
    if kind == "l2":
        return sum(torch.linalg.vector_norm(d) for d in diffs)  # type: ignore[return-value]
    if kind == "l1":
        return sum(d.abs().mean() for d in diffs)  # type: ignore[return-value]
    raise ValueError(f"total variation kind must be 'l1' or 'l2', got {kind!r}")


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS(p, q) = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2, averaged over the batch."""
    m = 0.5 * (p + q)
    log_m = torch.log(m.clamp_min(1e-30))
    kl_pm = (p * (torch.log(p.clamp_min(1e-30)) - log_m)).sum(dim=1)
    kl_qm = (q * (torch.log(q.clamp_min(1e-30)) - log_m)).sum(dim=1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def clamped_mean_kl(p: torch.Tensor, q: torch.Tensor, lo: float = 0.01, hi: float = 0.99) -> torch.Tensor:
    """The Adaptive DeepInversion authors' "JS" term: (KL(m || p) + KL(m || q)) / 2 with m = (p + q) / 2, where
    p, q and m are each clamped to [lo, hi] (not renormalised) first; KL averaged over the batch. It is not the
    Jensen-Shannon divergence (:func:`js_divergence`), whose KLs run the other way."""
    m = (0.5 * (p + q)).clamp(lo, hi)
    p, q = p.clamp(lo, hi), q.clamp(lo, hi)
    kl_mp = (m * (torch.log(m) - torch.log(p))).sum(dim=1)
    kl_mq = (m * (torch.log(m) - torch.log(q))).sum(dim=1)
    return (0.5 * (kl_mp + kl_mq)).mean()


class BNStatistics:
    """Records, on every forward of `model`, R_bn = sum over its BatchNorm layers of
    ``||mean(x) - running_mean||_2 + ||var(x) - running_var||_2`` of each layer's input (biased variance
    over batch and space, as the layer computes it in training).

    With ``momentum`` m > 0 (FastDFKD's "bn_mmt"), the batch's statistics are first blended with a running
    average of earlier syntheses': mean(x) -> (1 - m) mean(x) + m mean_mmt (the same for the variance), and
    :meth:`update_momentum` folds the last forward's statistics into that average (m mmt + (1 - m) last).

    ``loss`` holds the sum after a forward; ``enabled = False`` pauses recording (forwards that are not
    synthesis steps); ``remove()`` detaches the hooks."""

    def __init__(self, model: nn.Module, momentum: float = 0.0):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.running_mean is not None]
        self.terms: list[torch.Tensor] = []
        self.enabled = True
        self.momentum = momentum
        self.index = {id(m): i for i, m in enumerate(self.layers)}
        self.last: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        #: the running average of earlier syntheses' statistics (None before the first update)
        self.mmt: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        i = self.index[id(module)]
        self.last[i] = (mean.detach(), var.detach())
        if self.mmt is not None and self.momentum > 0:
            m = self.momentum
            mean, var = (1 - m) * mean + m * self.mmt[i][0], (1 - m) * var + m * self.mmt[i][1]
        self.terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                          + torch.linalg.vector_norm(var - module.running_var))

    def update_momentum(self) -> None:
        """Fold the last recorded forward's statistics into the running average."""
        last = [s for s in self.last if s is not None]
        if len(last) != len(self.layers):
            return
        m = self.momentum
        self.mmt = [(a.clone(), b.clone()) for a, b in last] if self.mmt is None else [
            (m * om + (1 - m) * a, m * ov + (1 - m) * b) for (om, ov), (a, b) in zip(self.mmt, last)]

    @property
    def loss(self) -> torch.Tensor:
        if not self.terms:
            raise RuntimeError("no BatchNorm statistics recorded: run the model forward first")
        return torch.stack(self.terms).sum()

    def clear(self) -> None:
        self.terms = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
