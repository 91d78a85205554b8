"""The cost meter's arithmetic: windows, totals, baseline, ratios, latency, and reconciliation of any stream
(every window a valid metrics.v1 message). The fakes are in tests/unit/observe/fakes.py; the emitter against
the real broker is in tests/integration/test_emitter.py."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer import contracts
from consumer.observe.emitter import metrics_message
from consumer.observe.meter import Counts, Meter, PoolCounters, cost_ratio, shunt_rate
from consumer.observe.probe import Reading, ServiceInfo
from tests.unit.observe.fakes import DEFAULT_COMPLETION, PRICE, answer, apply, feed_mixed


def test_windows_and_totals_add_up() -> None:
    meter, pool = Meter(PRICE, DEFAULT_COMPLETION), PoolCounters(requests=2, retries=1, rate_limited=1, errors=0)
    feed_mixed(meter)
    first, totals = meter.close_window(pool)
    assert (first.reviews_in, first.labeled, first.small, first.large, first.dlq) == (3, 2, 1, 1, 1)
    assert first.dlq_by_reason == {"invalid_json": 1}
    assert (totals.llm_requests, totals.llm_retries, totals.llm_429s) == (2, 1, 1)
    meter.on_input()
    meter.on_labeled("fallback", 0.0, None, 90, 500.0)
    second, totals = meter.close_window(PoolCounters(requests=5, retries=3, rate_limited=1, errors=2))
    assert (second.reviews_in, second.labeled, second.fallback, second.dlq, second.dlq_by_reason) == (1, 1, 1, 0, {})
    assert (second.llm_requests, second.llm_retries, second.llm_errors) == (3, 2, 2)
    assert totals.reviews_in == totals.labeled + totals.dlq == 4
    assert first.cost_usd + second.cost_usd == totals.cost_usd == answer(100, 5).cost_usd
    empty = meter.close(PoolCounters(requests=5, retries=3, rate_limited=1, errors=2))
    assert empty.window.as_dict() == Counts().as_dict()


def test_baseline_prices_every_labelled_review_as_one_llm_call() -> None:
    meter = Meter(PRICE, DEFAULT_COMPLETION)
    meter.on_labeled("small", 0.0, None, 80, 1.0)  # before any answer: the configured completion cap
    meter.on_labeled("large", answer(100, 4).cost_usd, answer(100, 4), 0, 30.0)
    meter.on_labeled("large", answer(120, 8).cost_usd, answer(120, 8), 0, 30.0)
    meter.on_labeled("small", 0.0, None, 70, 1.0)  # after: the average completion so far, 6
    prompt = 80 + 100 + 120 + 70
    completion = DEFAULT_COMPLETION + 4 + 8 + 6
    expected = (prompt * 0.15 + completion * 0.60) / 1e6
    assert meter.totals.baseline_cost_usd == pytest.approx(expected, rel=1e-12)
    totals = meter.peek(PoolCounters())
    assert totals.baseline_cost_usd == meter.baseline_cost()
    assert cost_ratio(totals) == pytest.approx((answer(100, 4).cost_usd + answer(120, 8).cost_usd) / expected)


def test_cached_answer_is_free_but_counts_in_the_baseline() -> None:
    meter = Meter(PRICE, DEFAULT_COMPLETION)
    meter.on_labeled("large", answer(100, 6).cost_usd, answer(100, 6), 0, 30.0)
    before = meter.totals.baseline_cost_usd
    meter.on_labeled("large", 0.0, answer(100, 6, cached=True), 0, 1.0)  # no estimate: the average prompt
    assert meter.totals.cache_hits == 1 and meter.totals.large == 2
    assert meter.totals.prompt_tokens == 100 and meter.totals.cost_usd == answer(100, 6).cost_usd
    assert meter.totals.baseline_cost_usd == pytest.approx(2 * before, rel=1e-12)


def test_shunt_rate_and_cost_ratio() -> None:
    counts = Counts(labeled=10, small=7, large=2, fallback=1, cost_usd=0.3, baseline_cost_usd=1.2)
    assert shunt_rate(counts) == pytest.approx(0.3)
    assert cost_ratio(counts) == pytest.approx(0.25)
    assert shunt_rate(Counts()) is None and cost_ratio(Counts()) is None


def test_latency_percentiles_per_window_and_cumulative_histograms() -> None:
    meter = Meter(PRICE, DEFAULT_COMPLETION)
    for ms in range(1, 101):
        meter.on_labeled("small", 0.0, None, 50, float(ms))
    first = meter.close(PoolCounters())
    assert first.latency["small"] == {"count": 100, "p50": 51.0, "p95": 96.0, "p99": 100.0}
    assert first.latency["large"] == {"count": 0, "p50": None, "p95": None, "p99": None}
    meter.on_labeled("large", 0.0, answer(10, 1), 0, 2_000.0)
    second = meter.close(PoolCounters())
    assert second.latency["small"]["count"] == 0 and second.latency["large"]["p99"] == 2_000.0
    small = meter.histograms["small"]
    assert small.count == 100 and small.sum == sum(range(1, 101))
    buckets = dict(small.cumulative())
    assert buckets[1] == 1 and buckets[50] == 50 and buckets[100] == 100 and buckets[float("inf")] == 100
    assert meter.latency["small"].summary()["count"] == 100  # the whole run, for compatibility


def test_costs_sum_exactly_whatever_the_order() -> None:
    costs = [0.1, 0.2, 0.3, 1e-9, 7.77e-6] * 200
    meter = Meter(PRICE, DEFAULT_COMPLETION)
    for cost in costs:
        meter.on_labeled("large", cost, answer(1, 1), 0, 1.0)
    assert meter.totals.cost_usd == math.fsum(costs) == float(sum(Fraction(c) for c in costs))


EVENT = st.one_of(
    st.tuples(st.just("small"), st.integers(1, 400)),
    st.tuples(st.just("large"), st.integers(1, 400), st.integers(1, 30)),
    st.tuples(st.just("cached"), st.integers(0, 400)),
    st.tuples(st.just("fallback"), st.integers(1, 400), st.floats(0, 1e-3)),
    st.tuples(st.just("dlq"), st.sampled_from(["invalid_json", "schema", "too_large", "llm_failed"])),
    st.tuples(st.just("close")),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(EVENT, max_size=120))
def test_any_stream_reconciles_and_every_window_is_a_valid_message(events: list[tuple[Any, ...]]) -> None:
    meter, costs, pool, windows = Meter(PRICE, DEFAULT_COMPLETION), [], PoolCounters(), []
    for event in events:
        if event[0] == "close":
            windows.append(meter.close(pool))
        else:
            costs.append(apply(meter, event))
    windows.append(meter.close(pool))
    reading = Reading(Counts(), "closed", 0, 0, 0.0, {"llm_backlog": 0}, {}, "m-1")
    info = ServiceInfo("i", "g", 0.9, "s4l-v1", "standin")
    for seq, closed in enumerate(windows):
        contracts.validate("metrics", metrics_message(info, seq, final=False, span_ms=(0, 1), closed=closed,
                                                      reading=reading))  # fmt: skip
    totals = windows[-1].totals
    assert totals.reviews_in == totals.labeled + totals.dlq
    assert totals.cost_usd == math.fsum(costs)
    summed = Counts()
    for closed in windows:
        assert all(v >= 0 for k, v in closed.window.as_dict().items() if k != "dlq_by_reason")
        for name in ("reviews_in", "labeled", "small", "large", "fallback", "cache_hits", "dlq"):
            setattr(summed, name, getattr(summed, name) + getattr(closed.window, name))
        summed.dlq_by_reason += closed.window.dlq_by_reason
    assert (summed.reviews_in, summed.labeled, summed.dlq, summed.dlq_by_reason) == (
        totals.reviews_in, totals.labeled, totals.dlq, totals.dlq_by_reason,
    )  # fmt: skip
    assert abs(math.fsum(w.window.cost_usd for w in windows) - totals.cost_usd) < 1e-12
    assert abs(math.fsum(w.window.baseline_cost_usd for w in windows) - totals.baseline_cost_usd) < 1e-12
