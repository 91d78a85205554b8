"""The cost meter: counts what the pipeline decided and what it cost, per window and in total.

The pipeline calls the ``on_*`` methods on the event loop; :meth:`Meter.close` closes a window and
:meth:`Meter.peek` reads the running totals without closing one. Costs are summed, exactly (as fractions),
from the values written into the output messages, so the metrics reconcile with the output topic.

Everything else the metrics report (LLM pool, queues, lag, model) is read by :mod:`consumer.observe.probe`.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, Protocol

from consumer.config import PriceConfig
from consumer.records import LlmAnswer, Source

_RESERVOIR = 20_000
LATENCY_PATHS = ("small", "large", "fallback")
# Upper bounds (ms) of the latency histogram buckets: from a fast small-model publish to a slow LLM retry.
LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000)
_COST_DIGITS = 12  # far below a cent, far above float noise


@dataclass
class Counts:
    """Counters of one window, or of the whole run. See docs/observability.md for each field."""

    reviews_in: int = 0
    labeled: int = 0
    small: int = 0
    large: int = 0
    fallback: int = 0
    cache_hits: int = 0
    dlq: int = 0
    dlq_by_reason: Counter[str] = field(default_factory=Counter)
    llm_requests: int = 0
    llm_retries: int = 0
    llm_429s: int = 0
    llm_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0

    def minus(self, other: Counts) -> Counts:
        """Field by field ``self - other`` (a window from two totals)."""
        diff = Counts()
        for f in fields(self):
            if f.name == "dlq_by_reason":
                diff.dlq_by_reason = self.dlq_by_reason - other.dlq_by_reason
            else:
                setattr(diff, f.name, getattr(self, f.name) - getattr(other, f.name))
        return diff

    def copy(self) -> Counts:
        clone = Counts(**{f.name: getattr(self, f.name) for f in fields(self)})
        clone.dlq_by_reason = Counter(self.dlq_by_reason)
        return clone

    def as_dict(self) -> dict[str, Any]:
        """The ``counts`` object of metrics.v1."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["dlq_by_reason"] = dict(self.dlq_by_reason)
        data["cost_usd"] = round(self.cost_usd, _COST_DIGITS)
        data["baseline_cost_usd"] = round(self.baseline_cost_usd, _COST_DIGITS)
        return data


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None when there is nothing to divide by."""
    return numerator / denominator if denominator > 0 else None


def shunt_rate(counts: Counts) -> float | None:
    """The share of labelled reviews the router sent to the LLM: (large + fallback) / labeled."""
    return ratio(counts.large + counts.fallback, counts.labeled)


def cost_ratio(counts: Counts) -> float | None:
    """What the stream cost over what it would have cost at the LLM alone (the paper's 31.18%)."""
    return ratio(counts.cost_usd, counts.baseline_cost_usd)


class Reservoir:
    """A bounded uniform sample of latencies, so percentiles cost flat memory under any load."""

    def __init__(self, size: int = _RESERVOIR, seed: int = 0) -> None:
        self._size = size
        self._seen = 0
        self._values: list[float] = []
        self._random = random.Random(seed)

    def add(self, value: float) -> None:
        self._seen += 1
        if len(self._values) < self._size:
            self._values.append(value)
        else:
            slot = self._random.randrange(self._seen)
            if slot < self._size:
                self._values[slot] = value

    def summary(self) -> dict[str, Any]:
        """``count`` and nearest-rank p50/p95/p99 (None when empty), as metrics.v1 carries them."""
        ordered = sorted(self._values)

        def pct(q: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None

        return {"count": self._seen, "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)}


class Histogram:
    """Cumulative latency buckets and sum, the way Prometheus histograms count them."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def add(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) per bucket, ending with (inf, count)."""
        running, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self._counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class PoolCountersView(Protocol):
    """What the meter needs from the LLM pool's cumulative counters (``PoolStats`` or ``PoolCounters``)."""

    @property
    def requests(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def rate_limited(self) -> int: ...
    @property
    def errors(self) -> int: ...


@dataclass(frozen=True)
class PoolCounters:
    """What the LLM pool reports about its own calls (cumulative)."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: int = 0


@dataclass(frozen=True)
class Window:
    """One closed window: its counts, the totals at its end, and its latency percentiles per path."""

    window: Counts
    totals: Counts
    latency: dict[str, dict[str, Any]]


class Meter:
    """Counts per window and in total. Baseline: what the same reviews would have cost at the LLM.

    ``totals`` holds the pipeline's own counts; the ``llm_*`` fields come from the pool and are filled in
    by :meth:`peek` and :meth:`close`. ``latency`` samples the whole run, ``histograms`` count it."""

    def __init__(self, price: PriceConfig, default_completion_tokens: int) -> None:
        self._price = price
        self._default_completion = default_completion_tokens
        self.totals = Counts()
        self.latency: dict[str, Reservoir] = {p: Reservoir() for p in LATENCY_PATHS}
        self.histograms: dict[str, Histogram] = {p: Histogram() for p in LATENCY_PATHS}
        self._window_latency: dict[str, Reservoir] = {p: Reservoir() for p in LATENCY_PATHS}
        self._window_start = Counts()
        self._cost = Fraction(0)  # exact: float sums drift with the order of addition
        self._window_cost = Fraction(0)
        self._answered = 0  # uncached LLM answers: the sample behind the average completion
        self._baseline_prompt_tokens = 0
        self._baseline_completion_tokens = 0.0
        self._lane_cost: dict[str, Fraction] = {}  # only the lanes told apart (the batch lane's reviews)

    def on_input(self, count: int = 1) -> None:
        self.totals.reviews_in += count

    def on_dlq(self, reason: str) -> None:
        self.totals.dlq += 1
        self.totals.dlq_by_reason[reason] += 1

    def on_billed(self, cost_usd: float) -> None:
        """Count what the LLM billed for a review that gets no label (an invalid answer is paid for too)."""
        if cost_usd:
            self._cost += Fraction(cost_usd)
            self.totals.cost_usd = float(self._cost)

    def on_labeled(
        self, source: Source, cost_usd: float, answer: LlmAnswer | None, est_prompt_tokens: int, latency_ms: float
    ) -> None:
        """Count one published review. ``est_prompt_tokens``: the client's estimate, used for the baseline."""
        path = "large" if source == "cache" else source
        totals = self.totals
        totals.labeled += 1
        if path == "small":  # the hot path: one branch instead of setattr(getattr(...))
            totals.small += 1
        else:
            setattr(totals, path, getattr(totals, path) + 1)
        if cost_usd:  # the small path is free; an exact Fraction sum costs ~2 us a review
            self._cost += Fraction(cost_usd)
            totals.cost_usd = float(self._cost)
        real = None
        if answer is not None:
            if answer.cached:
                totals.cache_hits += 1
            else:
                real = answer
                self._answered += 1
                totals.prompt_tokens += real.prompt_tokens
                totals.completion_tokens += real.completion_tokens
        self._add_to_baseline(real, est_prompt_tokens)
        self.latency[path].add(latency_ms)
        self._window_latency[path].add(latency_ms)
        self.histograms[path].add(latency_ms)

    def _add_to_baseline(self, real: LlmAnswer | None, est_prompt_tokens: int) -> None:
        # Additive, review by review, so no window's baseline is ever negative: what the LLM charged where it
        # answered; elsewhere the prompt estimate and the completions' running average.
        if real is not None:
            self._baseline_prompt_tokens += real.prompt_tokens
            self._baseline_completion_tokens += real.completion_tokens
        else:
            self._baseline_prompt_tokens += est_prompt_tokens or round(self.average_prompt_tokens())
            self._baseline_completion_tokens += self.average_completion_tokens()
        self.totals.baseline_cost_usd = self.baseline_cost()

    def on_lane(self, lane: str, cost_usd: float) -> None:
        """Count a review's cost (already in :meth:`on_labeled`) against the lane that answered it."""
        self._lane_cost[lane] = self._lane_cost.get(lane, Fraction(0)) + Fraction(cost_usd)

    def lane_costs(self) -> dict[str, float]:
        """Cost per lane: the lanes counted with :meth:`on_lane`, and ``online`` for the rest of the total."""
        told = sum(self._lane_cost.values(), Fraction(0))
        costs = {lane: float(cost) for lane, cost in self._lane_cost.items()}
        costs["online"] = float(self._cost - told + self._lane_cost.get("online", Fraction(0)))
        return costs

    def average_completion_tokens(self) -> float:
        """Completion tokens per uncached LLM answer so far; the configured cap until the first one."""
        if self._answered > 0:
            return self.totals.completion_tokens / self._answered
        return float(self._default_completion)

    def average_prompt_tokens(self) -> float:
        """Prompt tokens per uncached LLM answer so far (0 before the first)."""
        return self.totals.prompt_tokens / self._answered if self._answered > 0 else 0.0

    def baseline_cost(self) -> float:
        price = self._price
        prompt_usd = self._baseline_prompt_tokens * price.input_per_mtok
        return (prompt_usd + self._baseline_completion_tokens * price.output_per_mtok) / 1e6

    def peek(self, pool: PoolCountersView) -> Counts:
        """The running totals with the pool's counters, without closing the window."""
        totals = self.totals.copy()
        totals.llm_requests, totals.llm_retries = pool.requests, pool.retries
        totals.llm_429s, totals.llm_errors = pool.rate_limited, pool.errors
        return totals

    def close(self, pool: PoolCountersView) -> Window:
        """Close the window: its counts, the totals, and its latency percentiles; then start a new one."""
        totals = self.peek(pool)
        window = totals.minus(self._window_start)
        window.cost_usd = float(self._cost - self._window_cost)
        latency = {path: sample.summary() for path, sample in self._window_latency.items()}
        self._window_start, self._window_cost = totals.copy(), self._cost
        self._window_latency = {p: Reservoir() for p in LATENCY_PATHS}
        return Window(window, totals, latency)

    def close_window(self, pool: PoolCountersView) -> tuple[Counts, Counts]:
        """Returns (window, totals) and starts a new window."""
        closed = self.close(pool)
        return closed.window, closed.totals
