"""Mean and 95% interval of per-seed values (megatron_selfjudge/stats.py) against hand-computed values."""
from __future__ import annotations

import math

import pytest

from megatron_selfjudge.stats import T975, mean_interval, paired_interval, t_quantile_975


def test_interval_of_hand_computed_values():
    # 1..5: mean 3, sample sd sqrt(10/4) = 1.58114, se = sd / sqrt(5) = 0.70711; t(4) = 2.776445.
    got = mean_interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert half == pytest.approx(1.963243, abs=1e-6)
    assert (got.mean, got.n) == (3.0, 5)
    assert got.low == pytest.approx(3 - half, abs=1e-9) and got.high == pytest.approx(3 + half, abs=1e-9)
    assert got.half_width == pytest.approx(half)
    # Two values 0.1, 0.3: mean 0.2, sd 0.141421, se 0.1, t(1) = 12.706205 -> [-1.0706, 1.4706].
    two = mean_interval([0.1, 0.3])
    assert two.low == pytest.approx(0.2 - 1.2706205, abs=1e-9) and two.high == pytest.approx(0.2 + 1.2706205, abs=1e-9)


def test_equal_values_have_a_zero_width_interval_and_one_value_none():
    same = mean_interval([0.25, 0.25, 0.25])
    assert same.low == same.high == 0.25
    one = mean_interval([0.4])
    assert one.mean == 0.4 and math.isnan(one.low) and one.as_dict() == {"mean": 0.4, "low": None, "high": None, "n": 1}
    assert one.format() == "+0.400 (n=1)"
    assert mean_interval([0.0, 0.02]).format(2) == "+0.01 [-0.12, +0.14]"


def test_paired_differences():
    # Differences 0.1, 0.0, 0.2: mean 0.1, sd 0.1, se 0.057735, t(2) = 4.302653.
    got = paired_interval([0.6, 0.5, 0.7], [0.5, 0.5, 0.5])
    assert got.mean == pytest.approx(0.1)
    assert got.half_width == pytest.approx(4.302653 * 0.1 / math.sqrt(3), abs=1e-9)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_interval([1.0], [1.0, 2.0])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) by integrating Student's t density (mpmath quadrature): independent of the table."""
    import mpmath

    c = mpmath.gamma((df + 1) / 2) / (mpmath.sqrt(df * mpmath.pi) * mpmath.gamma(df / 2))
    return float(0.5 + mpmath.quad(lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2), [0, x]))


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30, 31, 60, 200])
def test_quantiles_put_975_percent_below(df):
    pytest.importorskip("mpmath")
    assert _t_cdf(t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-7)


def test_expansion_continues_the_table():
    # Above 30 the expansion is used; at 30 it agrees with the table's entry to 1e-5.
    from megatron_selfjudge.stats import Z975, _cornish_fisher_975

    assert len(T975) == 30
    assert _cornish_fisher_975(30) == pytest.approx(T975[-1], abs=1e-5)
    assert t_quantile_975(31) == _cornish_fisher_975(31) < T975[-1]
    assert t_quantile_975(10_000) == pytest.approx(Z975, abs=1e-3)
