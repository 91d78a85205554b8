"""The closed loop's bookkeeping with a fake pool and sink and a fake clock: the spend cap's two priorities,
threshold events and their reasons, audits that never hold a review, and the metrics block's schema."""

from __future__ import annotations

from typing import Any, Literal

import orjson
import pytest
from structlog.testing import capture_logs

from consumer import contracts
from consumer.config import Settings, load_settings
from consumer.kafka.sink import OnDelivered, Outgoing
from consumer.observe.meter import Meter
from consumer.records import LlmAnswer, LlmOutcome, Origin, Prediction, Review, Scored
from consumer.stream.loop import ClosedLoop


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakePool:
    def __init__(self, label: str = "positive", cost: float = 0.001) -> None:
        self.answer, self.cost, self.asked = label, cost, []

    async def label(
        self, scored: Scored, prompt: Literal["s4l", "plain"] = "s4l", *, audit: bool = False
    ) -> LlmOutcome:
        self.asked.append((scored.review.id, prompt, audit))
        return LlmAnswer(self.answer, "standin", 100, 2, self.cost, 1.0, prompt)

    def backlog(self) -> int:
        return 0

    def audit_backlog(self) -> int:
        return 0


class FakeSink:
    def __init__(self) -> None:
        self.sent: list[Outgoing] = []

    async def publish(self, out: Outgoing, on_delivered: OnDelivered) -> None:
        self.sent.append(out)
        on_delivered()


def scored(i: int, confidence: float = 0.95) -> Scored:
    probs = {"positive": confidence, "negative": 1 - confidence}
    return Scored(
        Review(f"r-{i}", "fine kettle", Origin("reviews", 0, i)), Prediction("positive", confidence, probs, "v1")
    )


def make(settings: Settings, pool: FakePool, clock: Clock) -> tuple[ClosedLoop, FakeSink]:
    sink, tasks = FakeSink(), []
    loop = ClosedLoop(settings, pool=pool, sink=sink, meter=Meter(settings.llm.price(), 20),
                      watch=lambda task, name: tasks.append(task), estimate=lambda text: 100, clock=clock)  # fmt: skip
    return loop, sink


def budget(priority: str) -> Settings:
    return load_settings(None, {"budget": {"usd_per_hour": 3.6, "priority": priority, "min_threshold": 0.8},
                                "metrics": {"interval_s": 1.0}, "audit": {"rate": 0.0}})  # fmt: skip


async def test_with_priority_spend_the_cap_falls_back_and_lowers_tau_to_its_floor_then_lets_it_back() -> None:
    clock, pool = Clock(), FakePool(cost=0.0002)
    loop, _ = make(budget("spend"), pool, clock)  # allowance: $0.001 a second
    outcomes = [await loop.label(scored(i, 0.5)) for i in range(20)]
    refused = [o for o in outcomes if not isinstance(o, LlmAnswer)]
    assert refused and all(o.reason == "budget" for o in refused) and len(pool.asked) <= 6
    with capture_logs() as logs:
        for _ in range(10):
            clock.now += 0.25
            loop.threshold()
            [await loop.label(scored(100, 0.5)) for _ in range(20)]
        clock.now += 5  # the window empties: no pressure
        for _ in range(10):
            clock.now += 0.25
            loop.threshold()
    changes = [e for e in logs if e["event"] == "threshold_changed"]
    reasons = {e["reason"] for e in changes}
    assert reasons == {"budget_down", "budget_up"} and min(e["new"] for e in changes) == 0.8  # the floor
    assert loop.threshold() == 0.9 and loop.counts.budget_fallbacks > len(refused)


async def test_with_priority_accuracy_every_request_goes_and_overspend_is_logged_once_a_window() -> None:
    clock, pool = Clock(), FakePool(cost=0.0002)
    loop, _ = make(budget("accuracy"), pool, clock)
    with capture_logs() as logs:
        outcomes = [await loop.label(scored(i, 0.5)) for i in range(20)]
    assert all(isinstance(o, LlmAnswer) for o in outcomes) and loop.threshold() == 0.9
    exceeded = [e for e in logs if e["event"] == "budget_exceeded"]
    assert len(exceeded) == 1 and exceeded[0]["over_usd"] >= 0


async def test_an_audit_runs_beside_the_review_and_lands_in_distill_marked_audit() -> None:
    settings = load_settings(None, {"audit": {"rate": 1.0, "window": 10, "min_agreement": 0.9}})
    clock, pool = Clock(), FakePool(label="negative")  # the LLM disagrees with every small label
    loop, sink = make(settings, pool, clock)
    with capture_logs() as logs:
        for i in range(12):
            loop.on_small(scored(i))
        await loop.close(5.0)
    records = [orjson.loads(out.value) for out in sink.sent]
    assert len(records) == 12 and all(r["audit"] and r["llm_label"] == "negative" for r in records)
    for record in records:
        contracts.validate("distill", record)
    assert all(prompt == "plain" and audit for _, prompt, audit in pool.asked)
    assert [e["event"] for e in logs if e["event"].startswith("drift")] == ["drift_alarm"]
    block = loop.report(close_window=True)
    assert block["totals"]["audits"] == 12 and block["totals"]["audit_agreed"] == 0 and block["drift_alarm"]
    assert block["totals"]["audit_cost_usd"] == pytest.approx(12 * 0.001)
    assert loop.report(close_window=False)["window"]["audits"] == 0  # a new window


def test_the_loop_block_fits_metrics_v1() -> None:
    schema = orjson.loads(contracts.SCHEMA_DIR.joinpath("metrics.v1.json").read_bytes())
    assert "loop" in schema["properties"] and "now" in schema["properties"]
    loop, _ = make(budget("spend"), FakePool(), Clock())
    block: dict[str, Any] = loop.report(close_window=False)
    assert set(block) == set(schema["properties"]["loop"]["required"])
