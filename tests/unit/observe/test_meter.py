"""The cost meter's arithmetic (windows, totals, baseline, ratios, reconciliation) and the metrics emitter
publishing valid metrics.v1 messages to a real topic. The fakes here stand in for the pipeline, the LLM pool
and the sink; the observe and top/report tests reuse them. The emitter against the real broker is in
tests/integration/test_emitter.py."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from consumer import contracts
from consumer.config import PriceConfig, Settings, load_settings
from consumer.kafka.sink import KafkaSink, OnDelivered, Outgoing
from consumer.observe.emitter import MetricsEmitter, metrics_message
from consumer.observe.meter import Counts, Meter, PoolCounters, cost_ratio, shunt_rate
from consumer.observe.probe import Probe, Reading, ServiceInfo
from consumer.records import LlmAnswer
from consumer.records import TopicPartition as TP

PRICE = PriceConfig(input_per_mtok=0.15, output_per_mtok=0.60)
DEFAULT_COMPLETION = 20


# -- fakes ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeStats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: int = 0
    timeouts: int = 0
    breaker_state: str = "closed"
    breaker_transitions: int = 0
    backlog: int = 0
    cost_usd: float = 0.0


class FakePool:
    def __init__(self) -> None:
        self.current = FakeStats()

    def stats(self) -> FakeStats:
        return self.current


class FakeTracker:
    def __init__(self) -> None:
        self.marks: dict[TP, int] = {}
        self.pending = 0

    def in_flight(self, tps: list[TP] | None = None) -> int:
        return self.pending

    def watermarks(self) -> dict[TP, int]:
        return dict(self.marks)


class FakeSource:
    def __init__(self) -> None:
        self.closed = False
        self.assigned: list[TP] = []
        self.high: dict[TP, int] = {}

    def assignment(self) -> list[TP]:
        return list(self.assigned)

    def lag(self, stored: dict[TP, int]) -> dict[TP, int]:
        return {tp: max(0, self.high.get(tp, 0) - stored.get(tp, 0)) for tp in self.assigned}


@dataclass
class FakePipeline:
    tracker: FakeTracker = field(default_factory=FakeTracker)
    source: FakeSource = field(default_factory=FakeSource)


class FakeSink:
    """Acknowledges on demand, so tests decide when the broker 'answers'."""

    def __init__(self, auto_ack: bool = True) -> None:
        self.auto_ack = auto_ack
        self.published: list[Outgoing] = []
        self.waiting: list[OnDelivered] = []

    async def publish(self, out: Outgoing, on_delivered: OnDelivered) -> None:
        self.published.append(out)
        if self.auto_ack:
            on_delivered()
        else:
            self.waiting.append(on_delivered)

    def pending(self) -> int:
        return len(self.waiting)


def answer(prompt: int, completion: int, *, cached: bool = False) -> LlmAnswer:
    cost = 0.0 if cached else (prompt * PRICE.input_per_mtok + completion * PRICE.output_per_mtok) / 1e6
    return LlmAnswer(
        label="positive", model="standin", prompt_tokens=0 if cached else prompt,
        completion_tokens=0 if cached else completion, cost_usd=cost, latency_ms=12.0, prompt_version="s4l-v1",
        cached=cached,
    )  # fmt: skip


def make_settings(topic: str = "shunt.metrics", interval_s: float = 0.2, **extra: Any) -> Settings:
    overrides = {
        "kafka": {"bootstrap_servers": os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")},
        "topics": {"metrics": topic},
        "metrics": {"interval_s": interval_s, "instance_id": "inst-1"},
        "admin": {"port": 0},
    }
    for section, values in extra.items():
        overrides[section] = overrides.get(section, {}) | values
    return load_settings(None, overrides)


def make_probe(
    meter: Meter | None = None, sink: FakeSink | KafkaSink | None = None, model: str | None = "m-1"
) -> tuple[Probe, FakePool, FakePipeline]:
    pool, pipeline = FakePool(), FakePipeline()
    probe = Probe(
        ServiceInfo.from_settings(make_settings()), meter or Meter(PRICE, DEFAULT_COMPLETION), pipeline, pool,
        sink or FakeSink(), model_version=lambda: model,
    )  # fmt: skip
    return probe, pool, pipeline


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Wait on a condition (checked every 10 ms) with a deadline; never a bare sleep."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


# -- the meter ------------------------------------------------------------------------------------------------
def feed_mixed(meter: Meter) -> None:
    """3 inputs: one small, one large (100+5 tokens), one bad -> DLQ."""
    meter.on_input(3)
    meter.on_labeled("small", 0.0, None, 80, 2.0)
    meter.on_labeled("large", answer(100, 5).cost_usd, answer(100, 5), 0, 40.0)
    meter.on_dlq("invalid_json")


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


def apply(meter: Meter, event: tuple[Any, ...]) -> float:
    """Feed one event; returns the cost it put into an output message."""
    kind = event[0]
    if kind != "close":
        meter.on_input()
    if kind == "small":
        meter.on_labeled("small", 0.0, None, event[1], 1.0)
    elif kind == "large":
        reply = answer(event[1], event[2])
        meter.on_labeled("large", reply.cost_usd, reply, 0, 10.0)
        return reply.cost_usd
    elif kind == "cached":
        meter.on_labeled("large", 0.0, answer(1, 1, cached=True), event[1], 0.5)
    elif kind == "fallback":
        meter.on_labeled("fallback", event[2], None, event[1], 100.0)
        return float(event[2])
    elif kind == "dlq":
        meter.on_dlq(event[1])
    return 0.0


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


# -- the probe ------------------------------------------------------------------------------------------------
def test_probe_reads_queues_lag_and_keeps_the_last_lag_once_closed() -> None:
    probe, pool, pipeline = make_probe()
    pool.current = FakeStats(backlog=7, breaker_state="open", breaker_transitions=1, timeouts=2)
    pipeline.tracker.pending = 11
    pipeline.source.assigned = [("reviews", 0), ("reviews", 1)]
    pipeline.source.high = {("reviews", 0): 100, ("reviews", 1): 50}
    pipeline.tracker.marks = {("reviews", 0): 90}
    reading = probe.read()
    assert reading.queues == {"llm_backlog": 7, "in_flight": 11, "producer_queue": 0}
    assert reading.lag == {"reviews/0": 10, "reviews/1": 50}
    assert (reading.breaker_state, reading.breaker_transitions, reading.llm_timeouts) == ("open", 1, 2)
    pipeline.source.closed = True
    pipeline.source.assigned = []
    assert probe.read().lag == {"reviews/0": 10, "reviews/1": 50}
    assert probe.assignment() == []


# -- the emitter ----------------------------------------------------------------------------------------------
async def test_emitter_logs_a_failed_window_and_carries_on() -> None:
    calls = iter([RuntimeError("model registry down")])

    def flaky() -> str:
        failure = next(calls, None)
        if failure is not None:
            raise failure
        return "m-1"

    sink = FakeSink()
    probe = Probe(ServiceInfo.from_settings(make_settings()), Meter(PRICE, 20), FakePipeline(), FakePool(), sink,
                  model_version=flaky)  # fmt: skip
    with capture_logs() as logs:
        async with MetricsEmitter(probe, "m", 0.05) as emitter:
            await eventually(lambda: len(sink.published) >= 2, what="two windows after a failure")
    assert any(e["event"] == "metrics_emit_failed" for e in logs)
    messages = [orjson.loads(out.value) for out in sink.published]
    assert messages[-1]["final"] and [m["seq"] for m in messages] == list(range(len(messages)))
    assert emitter.seq == len(messages)
