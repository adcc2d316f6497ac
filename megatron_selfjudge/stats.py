"""Mean and 95% confidence interval of per-seed values (Student t, n - 1 degrees of freedom).

The project does not depend on SciPy, so the two-sided 97.5% quantiles of Student's t come from
a table for 1..30 degrees of freedom (the published values, 6 decimals; a comparison harness
rarely has more than 30 seeds) and, beyond 30, from the Cornish-Fisher expansion of the t
quantile around the normal one, whose error there is below 1e-5 (it matches the table's last
entry to that precision; tests/test_stats.py checks both against a numerical integration).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

# t_{0.975}(df) for df = 1..30.
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
Z975 = 1.959963984540054  # the standard normal's 97.5% quantile


def t_quantile_975(df: int) -> float:
    """Student t's 97.5% quantile (the half-width factor of a two-sided 95% interval) for df >= 1."""
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")
    return T975[df - 1] if df <= len(T975) else _cornish_fisher_975(df)


def _cornish_fisher_975(df: int) -> float:
    """The expansion of t_{0.975}(df) around the normal quantile, to 1/df^4."""
    z = Z975
    # Cornish-Fisher terms in powers of 1/df (Abramowitz & Stegun 26.7.5).
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclass(frozen=True)
class Interval:
    """Mean of n values and its 95% interval [low, high]; low/high are NaN when n < 2."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """(high - low) / 2."""
        return (self.high - self.low) / 2

    def as_dict(self) -> dict:
        """Plain numbers for JSON (NaN as None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    def format(self, digits: int = 3) -> str:
        """'+0.012 [-0.004, +0.028]' (or just the mean when n < 2)."""
        if math.isnan(self.low):
            return f"{self.mean:+.{digits}f} (n={self.n})"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def mean_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% Student-t interval of independent values (e.g. one per seed)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_interval needs at least one value")
    bad = next((v for v in xs if not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"mean_interval needs finite values, got {bad!r}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Mean and 95% interval of the per-seed differences a_i - b_i (paired by position)."""
    if len(a) != len(b):
        raise ValueError(f"paired values must have equal lengths, got {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)])
