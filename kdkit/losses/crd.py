"""Contrastive representation distillation (Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020).

The student's and the teacher's penultimate features are projected to a common width and L2-normalised
(g_s, g_t, linear maps trained with the student). Each sample's two views form the positive pair; K
negatives are other samples' embeddings kept in a memory. With h(v, u) = exp(<v, u> / tau) / Z, the noise
probability Pn = 1 / N (N training samples) and m = K, the NCE objective (eq. 17-18, as in the authors' code)

    L = - E_pos[ log h / (h + m Pn) ] - K E_neg[ log m Pn / (h + m Pn) ]

is applied twice: the student's embedding against the teacher's memory, and the teacher's against the
student's, and summed. Z is fixed at the first batch as mean(exp(<v, u> / tau)) * N, as in the authors' code.

Memories (:class:`ContrastMemory`):
- ``bank`` (the paper): one row per training sample and model, updated after each step as the normalised
  momentum average m_i <- normalise(mu m_i + (1 - mu) v_i), mu = 0.5; the positive is the sample's own row of
  the other model's bank; negatives are rows of other samples, drawn uniformly among samples of other classes
  (the authors' "exact" mode; ``relax``: among all samples).
- ``queue``: for data too large for a bank (memory ~ 2 N D floats): the positive is the other model's
  current embedding of the sample (detached), the negatives the last K embeddings of the other model (a
  first-in first-out queue, as in MoCo), N still the data size in Pn.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Memory = Literal["bank", "queue"]
Negatives = Literal["other_classes", "all"]


def nce_loss(probs: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """The NCE loss of ``[B, 1 + K]`` scores h (the positive first), noise probability 1 / n_data."""
    m = probs.shape[1] - 1
    noise = m / float(n_data)
    pos, neg = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + eps))
    log_d0 = torch.log(noise / (neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


class Embed(nn.Module):
    """Linear projection to the common width, then L2 normalisation (the authors' embedding head)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1).float()), dim=1)


class ContrastMemory(nn.Module):
    """The two models' memories and the scores h of each anchor against its positive and K negatives."""

    def __init__(self, dim: int, n_data: int, k: int, temperature: float = 0.07, momentum: float = 0.5,
                 memory: Memory = "bank", labels: torch.Tensor | None = None, negatives: Negatives = "other_classes"):
        super().__init__()
        self.n_data, self.k, self.temperature, self.momentum, self.memory = n_data, k, temperature, momentum, memory
        rows = n_data if memory == "bank" else k
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("mem_s", torch.rand(rows, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("mem_t", torch.rand(rows, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of the student's and the teacher's scores
        self.register_buffer("head", torch.zeros((), dtype=torch.long))  # queue: the next row to overwrite
        self.labels = labels if negatives == "other_classes" and memory == "bank" else None

    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + K]`` bank rows: each sample's own row, then K negatives (of other classes when labels are
        known), drawn with replacement from the global random generator (restored on resume)."""
        b = len(index)
        neg = torch.randint(0, self.n_data, (b, self.k), device=index.device)
        if self.labels is not None:
            labels = self.labels.to(index.device)
            y = labels[index][:, None]
            for _ in range(100):  # redraw the negatives that share the anchor's class
                same = labels[neg] == y
                if not bool(same.any()):
                    break
                neg[same] = torch.randint(0, self.n_data, (int(same.sum()),), device=index.device)
        return torch.cat([index[:, None], neg], dim=1)

    def scores(self, dots: torch.Tensor, which: int) -> torch.Tensor:
        """h = exp(<v, u> / tau) / Z of ``[B, 1 + K]`` dot products, Z fixed from the first batch's mean."""
        out = torch.exp(dots / self.temperature)
        if self.z[which] < 0:
            self.z[which] = out.mean().detach() * self.n_data
        return out / self.z[which].clone()  # a copy: the other side sets its constant in place

    @staticmethod
    def bank_dots(anchor: torch.Tensor, mem: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + K]`` dot products of each anchor with its bank rows. When the bank is not much larger than
        the rows drawn, one product with the whole bank and a gather of the scalars is several times faster on a
        CPU than gathering B (1 + K) rows of D floats (the same numbers up to rounding)."""
        b, n = rows.shape[0], mem.shape[0]
        if n <= 32 * rows.shape[1] and b * n <= 2**26:
            return torch.gather(anchor @ mem.detach().clone().T, 1, rows)  # a copy: update() writes the bank
        return torch.bmm(mem[rows], anchor[:, :, None]).squeeze(2)

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the student's anchors (against the teacher's memory) and of the teacher's (against the
        student's); then the memories take this batch in. `rows`: the bank rows ``[B, 1 + K]`` to score
        against (default: drawn by :meth:`sample`)."""
        if self.memory == "bank":
            idx = self.sample(index) if rows is None else rows
            dots_s, dots_t = self.bank_dots(v_s, self.mem_t, idx), self.bank_dots(v_t, self.mem_s, idx)
        else:  # the positive is the other model's current embedding, the negatives the queue (shared by the batch)
            dots_s = torch.cat([(v_s * v_t.detach()).sum(1, keepdim=True), v_s @ self.mem_t.clone().T], dim=1)
            dots_t = torch.cat([(v_t * v_s.detach()).sum(1, keepdim=True), v_t @ self.mem_s.clone().T], dim=1)
        out_s, out_t = self.scores(dots_s, 0), self.scores(dots_t, 1)
        self.update(v_s.detach(), v_t.detach(), index)
        return out_s, out_t

    @torch.no_grad()
    def update(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor) -> None:
        if self.memory == "bank":
            for mem, v in ((self.mem_s, v_s), (self.mem_t, v_t)):
                mem[index] = F.normalize(mem[index] * self.momentum + v * (1 - self.momentum), dim=1)
            return
        v_s, v_t = v_s[-self.k:], v_t[-self.k:]  # a batch larger than the queue keeps its last K
        pos = (int(self.head) + torch.arange(len(v_s), device=v_s.device)) % self.k
        self.mem_s[pos], self.mem_t[pos] = v_s, v_t
        self.head.fill_((int(self.head) + len(v_s)) % self.k)


class CRDLoss(nn.Module):
    """Projections of both models' features and the NCE objective on their scores (student + teacher side)."""

    def __init__(self, s_dim: int, t_dim: int, n_data: int, *, dim: int = 128, k: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, memory: Memory = "bank",
                 labels: torch.Tensor | None = None, negatives: Negatives = "other_classes"):
        super().__init__()
        self.n_data = n_data
        self.embed_s, self.embed_t = Embed(s_dim, dim), Embed(t_dim, dim)
        self.contrast = ContrastMemory(dim, n_data, k, temperature, momentum, memory, labels, negatives)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out_s, out_t = self.contrast(self.embed_s(f_s), self.embed_t(f_t.detach()), index)
        return nce_loss(out_s, self.n_data) + nce_loss(out_t, self.n_data)
