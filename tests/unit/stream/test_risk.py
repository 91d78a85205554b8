"""Exact binomial bounds against their definitions, and the risk-controlled threshold's guarantee."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.stream.risk import (
    binom_cdf,
    candidate_thresholds,
    clopper_pearson,
    clopper_pearson_lower,
    clopper_pearson_upper,
    min_support,
    risk_threshold,
)


@given(st.integers(1, 400), st.data())
def test_the_upper_bound_is_where_the_cdf_meets_alpha(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n - 1))
    upper = clopper_pearson_upper(k, n, 0.05)
    assert binom_cdf(k, n, upper) <= 0.05 + 1e-9  # at the bound, k or fewer is already unlikely
    assert binom_cdf(k, n, max(upper - 1e-6, 0.0)) > 0.05 - 1e-6  # just below it, not yet
    assert clopper_pearson_lower(k, n, 0.05) <= k / n <= upper


def test_known_values_and_edges() -> None:
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(0.258866, abs=1e-6)  # 1 - 0.05 ** (1/10)
    assert clopper_pearson_upper(3, 100, 0.05) == pytest.approx(0.075711, abs=1e-6)
    assert clopper_pearson_upper(0, 0, 0.05) == 1.0 and clopper_pearson_upper(5, 5, 0.05) == 1.0
    assert clopper_pearson_lower(0, 7, 0.05) == 0.0
    interval = clopper_pearson(50, 100, 0.95)
    assert interval.low < 0.5 < interval.high and interval.estimate == 0.5
    assert min_support(0.03, 0.05) == 157  # the fewest reviews with which one mistake still passes a 3% bound
    assert min_support(0.03, 0.05, errors=0) == 99  # 0.97 ** 99 < 0.05 < 0.97 ** 98


def test_the_grid_is_fixed_and_walks_down_from_one() -> None:
    grid = candidate_thresholds()
    assert grid[0] == 1.0 and grid[-1] == 0.5 and len(grid) == 101
    assert all(a > b for a, b in itertools.pairwise(grid))


def _calibrated(n: int, seed: int) -> tuple[list[float], list[bool]]:
    """Confidences in [0.5, 1) whose accuracy equals the confidence (a perfectly calibrated model)."""
    rng = random.Random(seed)
    conf = [0.5 + 0.5 * rng.random() ** 0.5 for _ in range(n)]
    return conf, [rng.random() < c for c in conf]


def test_the_chosen_tau_keeps_the_bound_and_a_lower_tau_would_not() -> None:
    conf, correct = _calibrated(20_000, 1)
    choice = risk_threshold(conf, correct, max_error=0.03)
    assert choice.threshold is not None and choice.upper_bound is not None
    assert choice.upper_bound <= 0.03
    kept = [c for c, _ in zip(conf, correct, strict=True) if c >= choice.threshold]
    assert len(kept) == choice.kept and 0 < choice.share_to_llm < 1
    below = round(choice.threshold - 0.005, 6)
    k = sum(1 for c, ok in zip(conf, correct, strict=True) if c >= below and not ok)
    n = sum(1 for c in conf if c >= below)
    assert clopper_pearson_upper(k, n, 0.05) > 0.03  # the search stopped at the first failure


def test_realised_error_on_fresh_data_stays_within_max_error_at_the_promised_rate() -> None:
    # The guarantee: P(true error of the chosen tau > max_error) <= 1 - risk_confidence. On a calibrated
    # model the true error above tau is known in closed form, so we count violations over many draws.
    violations, draws = 0, 200
    for seed in range(draws):
        conf, correct = _calibrated(3000, seed)
        tau = risk_threshold(conf, correct, max_error=0.05).threshold
        if tau is None:
            continue
        # Accuracy = confidence; confidence c = 0.5 + 0.5 * sqrt(u): the mean error of c >= tau is exact.
        fresh, fresh_ok = _calibrated(20_000, 10_000 + seed)
        kept = [ok for c, ok in zip(fresh, fresh_ok, strict=True) if c >= tau]
        violations += (1 - sum(kept) / len(kept)) > 0.05 + 0.004  # 0.004: the fresh sample's own noise
    assert violations / draws <= 0.05


def test_no_certified_tau_when_the_model_is_too_weak() -> None:
    rng = random.Random(3)
    conf = [0.5 + 0.5 * rng.random() for _ in range(2000)]
    correct = [rng.random() < 0.8 for _ in conf]  # 20% wrong at every confidence
    choice = risk_threshold(conf, correct, max_error=0.03)
    assert choice.threshold is None and choice.share_to_llm == 1.0


def _direct_cdf(k: int, n: int, p: float) -> float:
    """The definition, term by term with exact binomial coefficients (small n only)."""
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@given(st.integers(1, 300), st.data())
def test_the_cdf_summed_over_the_shorter_tail_is_the_definition(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(-1, n + 1))
    p = data.draw(st.floats(1e-6, 1 - 1e-6))
    assert binom_cdf(k, n, p) == pytest.approx(_direct_cdf(min(max(k, -1), n), n, p) if k >= 0 else 0.0, abs=1e-11)


@given(st.integers(600, 3000), st.data())
def test_a_long_tail_summed_in_numpy_agrees_with_the_short_one(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(257, n // 2))
    p = data.draw(st.floats(0.05, 0.95))
    by_complement = 1.0 - binom_cdf(n - k - 1, n, 1.0 - p)  # the other tail: also long, summed the same way
    assert binom_cdf(k, n, p) == pytest.approx(by_complement, abs=1e-9)
    if n <= 1000:  # exact binomial coefficients still fit a float
        assert binom_cdf(k, n, p) == pytest.approx(_direct_cdf(k, n, p), abs=1e-9)
