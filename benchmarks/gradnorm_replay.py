"""Replay GradNorm's weight updates on gradient norms and training rates held fixed at the values a run logged.

A run with ``method.weighting=gradnorm`` logs, each epoch, every path's mean gradient norm on the shared weights
(``gradnorm/grad/<path>``) and its relative inverse training rate (``gradnorm/r/<path>``). Held fixed, these
decide where each update rule takes the weights:

* ``kdkit``: kdkit's rule, :meth:`kdkit.weighting.GradNormWeighting.update` itself (multiplicative steps relative
  to the mean weighted norm, then the weights renormalised to sum to the number of paths);
* ``paper``: Adam steps on the weights themselves with the gradient of sum_i |g_i G_i - target_i| (target held
  fixed), sign_i G_i, then clamped positive and renormalised: how the common implementations take the paper's rule.

Both start at g = 1 and print the final weights, the weighted norms g_i G_i and their sum, beside the sum under
equal weights (sum_i G_i). The losses passed to kdkit's rule are the rates themselves (its r is their ratio to
the first update's, relative to the mean), so both rules see the same r.

    python benchmarks/gradnorm_replay.py benchmarks/results/gradnorm_detection_seed0.jsonl --epoch 1 --updates 350
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kdkit.weighting import GradNormWeighting


def logged(path: Path, epoch: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("event") == "epoch" and rec.get("epoch") == epoch:
            names = [k[len("gradnorm/grad/"):] for k in rec if k.startswith("gradnorm/grad/")]
            if not names:
                raise SystemExit(f"epoch {epoch} of {path} has no gradnorm/grad/* values: not a GradNorm run")
            return (names, torch.tensor([rec[f"gradnorm/grad/{n}"] for n in names]),
                    torch.tensor([rec[f"gradnorm/r/{n}"] for n in names]))
    raise SystemExit(f"no epoch {epoch} in {path}")


def kdkit_rule(names: list[str], norms: torch.Tensor, r: torch.Tensor, updates: int, alpha: float,
               lr: float) -> torch.Tensor:
    gn = GradNormWeighting(names, shared=list, alpha=alpha, lr=lr)
    gn.update(torch.ones(len(names)), norms)  # the first update fixes L(0) = 1, so later ratios are r itself
    gn.g.fill_(1.0)
    for _ in range(updates):
        gn.update(r, norms)
    return gn.g.clone()


def paper_rule(norms: torch.Tensor, r: torch.Tensor, updates: int, alpha: float, lr: float) -> torch.Tensor:
    g = torch.nn.Parameter(torch.ones(len(norms)))
    opt = torch.optim.Adam([g], lr=lr)
    for _ in range(updates):
        with torch.no_grad():
            weighted = g * norms
            target = weighted.mean() * r.pow(alpha)
        g.grad = torch.sign(weighted - target) * norms
        opt.step()
        with torch.no_grad():
            g.clamp_(min=0.0)
            g.mul_(len(norms) / g.sum())
    return g.detach().clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, help="a GradNorm run's metrics.jsonl")
    p.add_argument("--epoch", type=int, default=1)
    p.add_argument("--updates", type=int, default=350)
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--lr", type=float, default=0.025)
    a = p.parse_args()
    names, norms, r = logged(a.metrics, a.epoch)
    out = {"paths": names, "norms": norms.tolist(), "r": r.tolist(), "updates": a.updates,
           "equal_weights_summed_norm": float(norms.sum())}
    for rule, g in (("kdkit", kdkit_rule(names, norms, r, a.updates, a.alpha, a.lr)),
                    ("paper", paper_rule(norms, r, a.updates, a.alpha, a.lr))):
        out[rule] = {"weights": g.tolist(), "weighted_norms": (g * norms).tolist(),
                     "summed_norm": float((g * norms).sum())}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
