"""Fakes of the pipeline, the LLM pool and the sink, and helpers the observe tests share (unit and integration).

They satisfy the ``*View`` protocols of :mod:`consumer.observe.probe`; ``apply`` feeds the meter one event."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from consumer.config import PriceConfig, Settings, load_settings
from consumer.kafka.sink import KafkaSink, OnDelivered, Outgoing
from consumer.observe.meter import Meter
from consumer.observe.probe import Probe, ServiceInfo
from consumer.records import LlmAnswer
from consumer.records import TopicPartition as TP

PRICE = PriceConfig(input_per_mtok=0.15, output_per_mtok=0.60)
DEFAULT_COMPLETION = 20


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


def feed_mixed(meter: Meter) -> None:
    """3 inputs: one small, one large (100+5 tokens), one bad -> DLQ."""
    meter.on_input(3)
    meter.on_labeled("small", 0.0, None, 80, 2.0)
    meter.on_labeled("large", answer(100, 5).cost_usd, answer(100, 5), 0, 40.0)
    meter.on_dlq("invalid_json")


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
