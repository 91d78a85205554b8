"""The report/top arithmetic on metrics.v1 messages: a period adds up windows, a fleet sums each instance's
latest totals (keeping a restarted instance's earlier runs), and the pieces both share. Messages are built by
the real meter and ``metrics_message`` and checked against the schema."""

from __future__ import annotations

from typing import Any

import pytest

from consumer import contracts
from consumer.observe.emitter import metrics_message
from consumer.observe.meter import Meter, PoolCounters
from consumer.observe.probe import Reading, ServiceInfo
from consumer.observe.summary import (
    Fleet,
    LatencyMix,
    Period,
    add_counts,
    configs,
    merged_lag,
    worst_breaker,
    zero_counts,
)
from tests.unit.observe.fakes import DEFAULT_COMPLETION, PRICE, answer

WINDOW_MS = 10_000


class Instance:
    """One instance's real meter; ``window`` closes a window into a valid metrics.v1 message."""

    def __init__(self, instance_id: str, group: str = "g", breaker: str = "closed") -> None:
        self.meter = Meter(PRICE, DEFAULT_COMPLETION)
        self.info = ServiceInfo(instance_id, group, 0.9, "s4l-v1", "standin")
        self.breaker, self.seq = breaker, 0

    def window(self, small: int, large: int, *, end_ms: int, lag: dict[str, int] | None = None) -> dict[str, Any]:
        for _ in range(small):
            self.meter.on_input()
            self.meter.on_labeled("small", 0.0, None, 80, 2.0)
        for _ in range(large):
            self.meter.on_input()
            self.meter.on_labeled("large", answer(100, 5).cost_usd, answer(100, 5), 0, 40.0)
        reading = Reading(self.meter.totals, self.breaker, 0, 0, 0.0, {"llm_backlog": 0}, lag or {}, "m-1")
        closed = self.meter.close(PoolCounters())
        span = (end_ms - WINDOW_MS, end_ms)
        message = metrics_message(self.info, self.seq, final=False, span_ms=span, closed=closed, reading=reading)
        contracts.validate("metrics", message)
        self.seq += 1
        return message


def test_a_period_adds_up_every_window_and_spans_them() -> None:
    a, b = Instance("a"), Instance("b", group="h", breaker="half_open")
    messages = [a.window(3, 1, end_ms=20_000), b.window(0, 2, end_ms=25_000), a.window(1, 0, end_ms=30_000)]
    period = Period()
    for message in messages:
        period.add(message)
    summary = period.summary()
    assert summary.counts["reviews_in"] == 7 and summary.counts["large"] == 3 and summary.counts["small"] == 4
    assert summary.counts["cost_usd"] == pytest.approx(3 * answer(100, 5).cost_usd, rel=1e-12)
    assert summary.seconds == 20.0 and summary.reviews_per_s == pytest.approx(7 / 20)
    assert summary.instances == ["a", "b"] and summary.groups == ["g", "h"] and summary.messages == 3
    assert summary.breaker_state == "half_open"
    assert summary.latency["large"]["count"] == 3 and summary.latency["small"]["p50"] == 2.0
    data = summary.as_json()
    assert data["shunt_rate"] == pytest.approx(3 / 7)
    assert data["savings_usd"] == pytest.approx(data["baseline_cost_usd"] - data["cost_usd"])


def test_an_empty_period_has_no_rates() -> None:
    summary = Period().summary()
    assert summary.seconds is None and summary.reviews_per_s is None and summary.breaker_state is None
    data = summary.as_json()
    assert data["shunt_rate"] is None and data["cost_ratio"] is None and data["savings_pct"] is None
    assert data["lag_total"] == 0 and data["configs"] == []


def test_a_fleet_keeps_the_totals_of_a_restarted_instance() -> None:
    now = 100_000
    first = Instance("a")
    first.window(2, 1, end_ms=now - 20_000)
    before = first.window(1, 1, end_ms=now - 10_000)
    again = Instance("a")  # the same instance id, started again from seq 0
    after = again.window(4, 0, end_ms=now)
    fleet = Fleet()
    fleet.add(before)
    fleet.add(after)
    summary = fleet.summary(now)
    assert summary.counts["reviews_in"] == before["totals"]["reviews_in"] + after["totals"]["reviews_in"] == 9
    assert summary.instances == ["a"] and summary.messages == 2
    assert summary.reviews_per_s == pytest.approx(4 / (WINDOW_MS / 1000))  # the live window only


def test_fleet_states_and_only_live_instances_give_rates_lag_and_breaker() -> None:
    now = 1_000_000
    live = Instance("live").window(5, 0, end_ms=now, lag={"reviews/0": 3})
    stale = Instance("stale", breaker="open").window(5, 0, end_ms=now - 60_000, lag={"reviews/1": 9})
    final = dict(Instance("final").window(1, 0, end_ms=now), final=True)
    fleet = Fleet()
    for message in (live, stale, final):
        fleet.add(message)
    assert [fleet.state(m, now) for m in (live, stale, final)] == ["live", "stale", "final"]
    summary = fleet.summary(now)
    assert summary.counts["reviews_in"] == 11  # every instance's totals count
    assert summary.reviews_per_s == pytest.approx(0.5) and summary.lag == {"reviews/0": 3}
    assert summary.breaker_state == "closed"


def test_latency_mix_is_exact_for_one_window_and_count_weighted_for_several() -> None:
    one = LatencyMix()
    one.add({"small": {"count": 4, "p50": 2.0, "p95": 5.0, "p99": 9.0}})
    assert one.result()["small"] == {"count": 4, "p50": 2.0, "p95": 5.0, "p99": 9.0}
    assert one.result()["large"] == {"count": 0, "p50": None, "p95": None, "p99": None}
    one.add({"small": {"count": 1, "p50": 7.0, "p95": 10.0, "p99": 14.0}})
    assert one.result()["small"] == {"count": 5, "p50": 3.0, "p95": 6.0, "p99": 10.0}


def test_breaker_lag_configs_and_counts() -> None:
    assert worst_breaker(["closed", "open", "half_open"]) == "open"
    assert worst_breaker(["closed", "unknown"]) == "closed" and worst_breaker([]) is None
    old = {"window_end_ms": 1, "lag": {"t/0": 5, "t/1": 1}}
    new = {"window_end_ms": 2, "lag": {"t/0": 2}}
    assert merged_lag([new, old]) == {"t/0": 2, "t/1": 1}
    config = {"threshold": 0.9, "model_version": "m", "prompt_version": "p", "llm_model": "l"}
    assert configs([config, dict(config), dict(config, threshold=0.8)]) == [
        "threshold 0.8, model m, prompt p, llm l", "threshold 0.9, model m, prompt p, llm l",
    ]  # fmt: skip
    more = dict(zero_counts(), reviews_in=2, dlq=1, dlq_by_reason={"invalid_json": 1})
    total = add_counts(add_counts(zero_counts(), more), more)
    assert total["reviews_in"] == 4 and total["dlq_by_reason"] == {"invalid_json": 2}
