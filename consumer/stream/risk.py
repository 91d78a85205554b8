"""Exact binomial confidence bounds and the risk-controlled threshold.

The threshold rule: the lowest tau whose upper confidence bound on the small path's error is at most
``max_error``. Searching over tau is multiple testing; we use fixed-sequence testing (Learn then Test,
Angelopoulos et al., 2021): the candidate taus are fixed in advance and tested from the highest (the
fewest, surest reviews) down, each at the full level alpha, stopping at the first tau that fails. Because
the order is fixed before looking at the labels and the search stops at the first failure, the chance that
the chosen tau's true error exceeds ``max_error`` is at most alpha, with no Bonferroni penalty. The top of
the grid holds too few reviews for a test to have any power (one confident mistake among 99 reviews fails a
3% bound and would end the search at once); the sequence starts at the first tau that keeps
:func:`min_support` reviews — enough for one mistake to pass — a choice made from the counts alone, so the
labels play no part in it and the guarantee holds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_BISECT_STEPS = 60
_NUMPY_FROM = 256  # tails longer than this are summed in numpy


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space over the shorter tail (at most n/2 terms; exact
    to ~1e-11 absolute, far finer than the bound search needs to compare it with alpha)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    if k > n // 2:  # P(X <= k) = 1 - P(Y <= n - k - 1) with Y ~ Binomial(n, 1 - p): fewer terms
        return max(0.0, 1.0 - _lower_tail(n - k - 1, n, 1.0 - p))
    return _lower_tail(k, n, p)


def _lower_tail(k: int, n: int, p: float) -> float:
    """P(X <= k), the pmf's logs by the ratio of neighbours (one log a term instead of three lgammas);
    a long tail (a large cumulative count) in numpy, so a metrics snapshot never stalls the loop."""
    top_log = _log_binom_pmf(k, n, p)
    odds = math.log1p(-p) - math.log(p)
    if k > _NUMPY_FROM:
        i = np.arange(k, 0, -1, dtype=np.float64)
        steps = np.log(i / (n - i + 1)) + odds  # log pmf(i - 1) - log pmf(i), for i = k .. 1
        logs = np.concatenate(([top_log], top_log + np.cumsum(steps)))
        peak = float(logs.max())
        return min(1.0, math.exp(peak) * float(np.exp(logs - peak).sum()))
    terms = [0.0] * (k + 1)
    terms[k] = top_log
    for j in range(k, 0, -1):
        terms[j - 1] = terms[j] + math.log(j / (n - j + 1)) + odds
    peak = max(terms)
    return min(1.0, math.exp(peak) * math.fsum(math.exp(v - peak) for v in terms))


@functools.lru_cache(maxsize=1 << 16)
def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided upper (1 - alpha) bound on p after k successes in n trials (1.0 when n is 0).

    Cached: the drift alarm asks for the same few (k, n) after every audit, the adaptive rule for the same
    error counts every few samples; each answer is a 60-step bisection.

    The p at which P(X <= k) = alpha, found by bisection (the CDF falls as p grows); the upper end of the
    last bracket is returned, so the bound errs on the safe side."""
    if n <= 0 or k >= n:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(_BISECT_STEPS):
        mid = (low + high) / 2
        if binom_cdf(k, n, mid) > alpha:
            low = mid
        else:
            high = mid
    return high


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided lower (1 - alpha) bound on p after k successes in n trials (0.0 when k is 0)."""
    if n <= 0 or k <= 0:
        return 0.0
    return 1.0 - clopper_pearson_upper(n - k, n, alpha)


@dataclass(frozen=True, slots=True)
class Interval:
    """A two-sided interval for a proportion: ``k`` of ``n``, point estimate and bounds."""

    k: int
    n: int
    estimate: float | None
    low: float
    high: float


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """The exact two-sided interval (each tail alpha/2)."""
    alpha = (1.0 - confidence) / 2
    estimate = k / n if n else None
    return Interval(k, n, estimate, clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha))


def candidate_thresholds(step: float = 0.005, low: float = 0.5) -> list[float]:
    """The fixed, data-independent grid the search walks, from the top: 1.0, 0.995, ... ``low``."""
    count = round((1.0 - low) / step)
    return [round(1.0 - i * step, 6) for i in range(count + 1)]


@dataclass(frozen=True, slots=True)
class RiskChoice:
    """The chosen threshold (None: no tau certified, send everything), its bound and what it keeps."""

    threshold: float | None
    upper_bound: float | None
    kept: int
    errors: int
    total: int

    @property
    def share_to_llm(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 1.0


def risk_threshold(
    confidences: Sequence[float],
    correct: Sequence[bool],
    max_error: float,
    risk_confidence: float = 0.95,
    candidates: Sequence[float] | None = None,
) -> RiskChoice:
    """Fixed-sequence testing from the highest candidate down; see the module docstring."""
    alpha = 1.0 - risk_confidence
    pairs = sorted(zip(confidences, correct, strict=True), key=lambda pair: -pair[0])
    floor = min_support(max_error, alpha)
    chosen = RiskChoice(None, None, 0, 0, len(pairs))
    kept = errors = 0
    for tau in sorted(candidates or candidate_thresholds(), reverse=True):
        while kept < len(pairs) and pairs[kept][0] >= tau:
            errors += not pairs[kept][1]
            kept += 1
        if kept < floor:
            continue  # no test yet: too few reviews for one mistake to pass (decided by counts, not labels)
        bound = clopper_pearson_upper(errors, kept, alpha)
        if bound > max_error:
            break
        chosen = RiskChoice(tau, bound, kept, errors, len(pairs))
    return chosen


def min_support(max_error: float, alpha: float, errors: int = 1) -> int:
    """The fewest reviews for which ``errors`` mistakes still give an upper bound within ``max_error``.

    The search starts testing there: above it a single confident mistake would end the sequence at once,
    though a lower tau (more reviews) could be certified. The count depends on nothing but the grid
    position's number of reviews, never on the labels."""
    if max_error <= 0.0:
        return 1 << 62
    low, high = errors + 1, 1 << 24
    if clopper_pearson_upper(errors, high, alpha) > max_error:
        return high
    while low < high:
        mid = (low + high) // 2
        if clopper_pearson_upper(errors, mid, alpha) <= max_error:
            high = mid
        else:
            low = mid + 1
    return low
