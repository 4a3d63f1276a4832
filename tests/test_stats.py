"""Numerics of the confidence intervals against published values and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robo_rlft.stats import mean_ci95, student_t_quantile, student_t_sf, wilson_ci95

# t_{0.975, dof} from standard tables (to the printed 3 decimals).
T_975_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045, 1000: 1.962}


@pytest.mark.parametrize(("dof", "expected"), sorted(T_975_TABLE.items()))
def test_t_quantile_matches_table(dof: int, expected: float) -> None:
    assert student_t_quantile(0.975, dof) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.9999])
def test_t_quantile_closed_forms(p: float) -> None:
    # dof = 1 is the Cauchy distribution; dof = 2 has t = (2p - 1) / sqrt(2 p (1 - p)).
    assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
    assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)


@pytest.mark.parametrize("dof", [3, 9, 29])
def test_t_quantile_against_integrated_pdf(dof: int) -> None:
    # Independent of the incomplete-beta code: Simpson's rule on the t density from 0 to q.
    q = student_t_quantile(0.975, dof)
    x = np.linspace(0.0, q, 20001)
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    pdf = np.exp(log_c - (dof + 1) / 2 * np.log1p(x * x / dof))
    h = x[1] - x[0]
    integral = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    assert 0.5 + integral == pytest.approx(0.975, abs=1e-12)
    assert student_t_sf(q, dof) == pytest.approx(0.025, abs=1e-14)


def test_t_quantile_large_dof_tends_to_normal() -> None:
    # Both branches (bisection below 1e5 dof, Cornish-Fisher above) agree at the switch.
    below, above = student_t_quantile(0.975, 1e5), student_t_quantile(0.975, 1e5 + 1)
    assert below == pytest.approx(above, abs=1e-9)
    assert student_t_quantile(0.975, 1e12) == pytest.approx(1.959963984540054, abs=1e-10)
    assert student_t_quantile(0.5, 7) == 0.0


def test_mean_ci95_known_values() -> None:
    mean, half = mean_ci95(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    # s = sqrt(2.5), n = 5, t_{0.975, 4} = 2.7764451...
    assert mean == 3.0
    assert half == pytest.approx(2.7764451051977 * math.sqrt(2.5) / math.sqrt(5), rel=1e-10)
    mean, half = mean_ci95(np.full(4, 7.5))
    assert (mean, half) == (7.5, 0.0)


def test_mean_ci95_single_value_has_nan_half_width() -> None:
    mean, half = mean_ci95(np.array([3.25]))
    assert mean == 3.25
    assert math.isnan(half)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.array([]), "empty"),
        (np.ones((2, 3)), "1-D"),
        (np.array([1.0, np.nan, 2.0]), "non-finite"),
    ],
)
def test_mean_ci95_rejects_bad_input(values: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mean_ci95(values)


def test_wilson_known_values() -> None:
    # 8/10: hand computation with z = 1.959964 gives (0.8, 0.4902, 0.9433).
    rate, lo, hi = wilson_ci95(8, 10)
    assert rate == 0.8
    assert lo == pytest.approx(0.490162, abs=1e-6)
    assert hi == pytest.approx(0.943318, abs=1e-6)
    # Edges are exact and stay inside [0, 1]; the interval is symmetric under s -> n - s.
    assert wilson_ci95(0, 10)[1] == 0.0
    assert wilson_ci95(10, 10)[2] == 1.0
    _, lo0, hi0 = wilson_ci95(0, 10)
    _, lo10, hi10 = wilson_ci95(10, 10)
    assert (lo10, hi10) == pytest.approx((1 - hi0, 1 - lo0), abs=1e-15)
    assert hi0 == pytest.approx(3.8414588 / (10 + 3.8414588), abs=1e-7)  # z² / (n + z²)


@pytest.mark.parametrize(
    ("successes", "n", "error", "match"),
    [
        (3, 0, ValueError, "n=0"),
        (11, 10, ValueError, "successes=11"),
        (-1, 10, ValueError, "successes=-1"),
        (2.0, 10, TypeError, "successes"),
        (True, 10, TypeError, "successes"),
    ],
)
def test_wilson_rejects_bad_input(successes: int, n: int, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        wilson_ci95(successes, n)


def test_wilson_accepts_numpy_ints() -> None:
    successes = np.sum(np.array([True, False, True]))
    assert wilson_ci95(successes, np.int64(3))[0] == pytest.approx(2 / 3)
