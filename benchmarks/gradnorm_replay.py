"""Replay GradNorm's weight updates on gradient norms and training rates held fixed at the values a run logged.

A run with ``method.weighting=gradnorm`` logs, each epoch, every path's mean gradient norm on the shared weights
(``gradnorm/grad/<path>``) and its relative inverse training rate (``gradnorm/r/<path>``). Held fixed, these
decide where each update rule takes the weights:

* ``relative``: kdkit's default rule (multiplicative steps relative to the mean weighted norm, then the weights
  renormalised to sum to the number of paths);
* ``adam``: the paper's rule as its common implementations take it (``method.gradnorm_rule=adam``): Adam steps on
  the weights themselves with the gradient of sum_i |g_i G_i - target_i| (target held fixed), sign_i G_i, then
  clamped at 0 and renormalised.

Both are :meth:`kdkit.weighting.GradNormWeighting.update` itself. Both start at g = 1 and print the final
weights, the weighted norms g_i G_i and their sum, beside the sum under equal weights (sum_i G_i). The losses
passed are the logged rates themselves, with L(0) = 1, so the rules see the logged r (divided by its mean, which
is 1 up to rounding).

    python benchmarks/gradnorm_replay.py benchmarks/results/gradnorm_detection_seed0.jsonl --epoch 1 --updates 350
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kdkit.weighting import GRADNORM_RULES, GradNormWeighting


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


def replay(rule: str, names: list[str], norms: torch.Tensor, r: torch.Tensor, updates: int, alpha: float,
           lr: float) -> torch.Tensor:
    """The weights after `updates` of kdkit's GradNorm under `rule`, from g = 1, on fixed norms and rates."""
    gn = GradNormWeighting(names, shared=list, alpha=alpha, lr=lr, rule=rule)
    gn.initial.fill_(1.0)  # L(0) = 1, so the losses passed below are the ratios, and r their ratio to the mean
    for _ in range(updates):
        gn.update(r, norms)
    return gn.g.clone()


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
    for rule in GRADNORM_RULES:
        g = replay(rule, names, norms, r, a.updates, a.alpha, a.lr)
        out[rule] = {"weights": g.tolist(), "weighted_norms": (g * norms).tolist(),
                     "summed_norm": float((g * norms).sum())}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
