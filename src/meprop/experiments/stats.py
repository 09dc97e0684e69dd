"""Summaries over seeds and paired comparisons, for reports that claim something.

One seed is an anecdote: on MNIST two seeds of the same run differ by ~0.3 point, as much as
the effects the paper reports. A report row is therefore run with several seeds and shown as
mean, standard deviation, min-max and the number of seeds; a claim such as "meProp >= dense"
compares the two methods *on the same seeds* (same initialisation and data order) and is
judged by the 95% t-interval of the mean paired difference:

* holds: the interval lies above 0;
* does not hold: it lies below 0;
* undecided: it contains 0 (too few seeds, or no difference to see).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "summarize", "Paired", "paired", "mean_interval", "T975"]

# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); above: 1.96 is within
# 2.5% of the exact value from 31 on.
T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
    9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
    17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
    25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}  # fmt: skip


def _t(dof: int) -> float:
    return T975.get(dof, 1.96)


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (0 for one value), min, max and count of values."""

    mean: float
    sd: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        if self.n == 1:
            return f"{self.mean:.2f}"
        return f"{self.mean:.2f} ± {self.sd:.2f}"


def summarize(values: Sequence[float]) -> Summary:
    """Summary of one or more values.

    Example:
        >>> str(summarize([98.1, 98.3, 98.2]))
        '98.20 ± 0.10'
    """
    if not values:
        raise ValueError("summarize needs at least one value")
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, sd, min(values), max(values), n)


@dataclass(frozen=True)
class Paired:
    """Mean of the paired differences a - b, its 95% interval, the number of pairs and the
    verdict on "a > b" (``holds``, ``does not hold`` or ``undecided``)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def verdict(self) -> str:
        if self.n < 2:
            return "undecided (one seed)"
        if self.lo > 0:
            return "holds"
        if self.hi < 0:
            return "does not hold"
        return "undecided"

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.2f} (1 pair)"
        return f"{self.mean:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}]"


def paired(a: dict, b: dict) -> Paired | None:
    """The comparison of ``a`` and ``b`` (seed -> score) on the seeds both have; None when they
    share none.

    Example:
        >>> p = paired({1: 98.3, 2: 98.5, 3: 98.4}, {1: 98.0, 2: 98.1, 3: 98.2})
        >>> p.verdict, round(p.mean, 2)
        ('holds', 0.3)
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return mean_interval([a[s] - b[s] for s in seeds])


def mean_interval(values: Sequence[float]) -> Paired:
    """The mean of ``values`` with its 95% t-interval (infinite for one value), as a ``Paired``
    whose verdict says whether the mean is above 0: the one-sample case of ``paired``.

    Example:
        >>> round(mean_interval([0.1, 0.2, 0.3]).lo, 3)
        -0.048
    """
    s = summarize(values)
    half = _t(s.n - 1) * s.sd / math.sqrt(s.n) if s.n > 1 else math.inf
    return Paired(s.mean, s.mean - half, s.mean + half, s.n)
