"""The statistics of comparisons: means with Student-t confidence intervals, and paired differences.

For n values x_1..x_n with mean m and sample standard deviation s, the two-sided confidence interval at
level c is ``m +- t_{(1+c)/2, n-1} * s / sqrt(n)``. A paired comparison of arm A against arm B takes the
seeds both have, d_i = A_i - B_i, and gives the same interval for the mean of d: pairing removes what
the two runs of one seed share (initialisation, data order), so an effect far smaller than the spread
between seeds can be seen. With 3 seeds and s = 0.3 points, the half-width is 4.30 * 0.3 / sqrt(3) =
0.75 points: nothing smaller can be told apart from zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t distribution with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass
class Interval:
    """Mean of n values with its confidence interval [low, high] (nan bounds when n < 2)."""

    n: int
    mean: float
    sd: float
    half_width: float
    level: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "low": self.low, "high": self.high}


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean, sample standard deviation and the Student-t confidence interval of `values`."""
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, level)
    m = sum(x) / n
    if n < 2:
        return Interval(1, m, math.nan, math.nan, level)
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1))
    return Interval(n, m, sd, t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n), level)


@dataclass
class Paired:
    """A against B on the seeds both have: the mean difference A - B with its interval, and the counts of
    seeds where A was above, below or equal to B."""

    diff: Interval
    seeds: list[int]
    wins: int
    losses: int
    ties: int

    @property
    def verdict(self) -> str:
        """'higher' / 'lower' when the interval excludes 0, 'cannot tell' when it holds it (or n < 2)."""
        d = self.diff
        if d.n < 2 or math.isnan(d.half_width):
            return "cannot tell"
        if d.low > 0:
            return "higher"
        if d.high < 0:
            return "lower"
        return "cannot tell"

    def to_dict(self) -> dict[str, Any]:
        return {"diff": self.diff.to_dict(), "seeds": self.seeds, "wins": self.wins, "losses": self.losses,
                "ties": self.ties, "verdict": self.verdict}


def paired(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Paired:
    """Paired differences a[s] - b[s] over the seeds s present in both."""
    seeds = sorted(set(a) & set(b))
    d = [float(a[s]) - float(b[s]) for s in seeds]
    return Paired(mean_ci(d, level), seeds, sum(v > 0 for v in d), sum(v < 0 for v in d), sum(v == 0 for v in d))


def unpaired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """mean(a) - mean(b) for two independent samples (no pairing), with Welch's interval: standard error
    sqrt(s_a^2/n_a + s_b^2/n_b), degrees of freedom by the Welch-Satterthwaite formula. Its `sd` is the
    standard error. Needs two values on each side."""
    x, y = mean_ci(a, level), mean_ci(b, level)
    if x.n < 2 or y.n < 2:
        return Interval(min(x.n, y.n), x.mean - y.mean, math.nan, math.nan, level)
    va, vb = x.sd ** 2 / x.n, y.sd ** 2 / y.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(min(x.n, y.n), x.mean - y.mean, 0.0, 0.0, level)
    df = (va + vb) ** 2 / (va ** 2 / (x.n - 1) + vb ** 2 / (y.n - 1))
    from scipy.stats import t

    return Interval(min(x.n, y.n), x.mean - y.mean, se, float(t.ppf((1 + level) / 2, df)) * se, level)
