"""The metrics emitter publishing valid metrics.v1 messages, windows and a final one, to a real topic."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from consumer import contracts
from consumer.kafka.sink import KafkaSink
from consumer.observe.emitter import MetricsEmitter
from consumer.observe.meter import Meter
from tests.support import kafka
from tests.unit.observe.fakes import (
    DEFAULT_COMPLETION,
    PRICE,
    FakeStats,
    eventually,
    feed_mixed,
    make_probe,
    make_settings,
)


def keyed_messages(topic: str, count: int) -> Iterator[tuple[bytes | None, dict[str, Any]]]:
    for message in kafka.read_until(topic, lambda m: len(m) >= count, 60):
        yield message.key(), orjson.loads(message.value())


@pytest.mark.kafka
async def test_emitter_publishes_valid_windows_and_a_final_one(topics: kafka.Topics) -> None:
    topic = topics.make("metrics")
    settings = make_settings(topic)
    sink = KafkaSink(settings.kafka)
    await sink.start()
    meter = Meter(PRICE, DEFAULT_COMPLETION)
    probe, pool, pipeline = make_probe(meter, sink)
    pipeline.source.assigned, pipeline.source.high = [("reviews", 0)], {("reviews", 0): 10}
    try:
        async with MetricsEmitter(probe, topic, settings.metrics.interval_s) as emitter:
            feed_mixed(meter)
            await eventually(lambda: emitter.seq >= 1, what="the first window")
            feed_mixed(meter)
            pool.current = FakeStats(requests=3, retries=1, rate_limited=1)
            pipeline.tracker.marks = {("reviews", 0): 6}
            await eventually(lambda: emitter.seq >= 3, what="two more windows")
            feed_mixed(meter)  # lands in the final window
    finally:
        await sink.close(10)
    received = list(await asyncio.to_thread(lambda: list(keyed_messages(topic, emitter.seq))))
    assert len(received) == emitter.seq
    assert {key for key, _ in received} == {b"inst-1"}
    messages = [m for _, m in received]
    for message in messages:
        contracts.validate("metrics", message)
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert [m["final"] for m in messages] == [False] * (len(messages) - 1) + [True]
    for earlier, later in itertools.pairwise(messages):
        assert later["window_start_ms"] == earlier["window_end_ms"]
    final = messages[-1]
    assert final["totals"] == meter.peek(pool.current).as_dict()
    assert final["totals"]["reviews_in"] == 9 == final["totals"]["labeled"] + final["totals"]["dlq"]
    assert sum(m["window"]["reviews_in"] for m in messages) == 9
    assert math.fsum(m["window"]["cost_usd"] for m in messages) == pytest.approx(final["totals"]["cost_usd"])
    assert (final["totals"]["llm_requests"], final["lag"], final["model_version"]) == (3, {"reviews/0": 4}, "m-1")
    assert final["shunt_rate"] == pytest.approx(0.5)
    assert final["cost_ratio"] == pytest.approx(final["totals"]["cost_usd"] / final["totals"]["baseline_cost_usd"])
    assert probe.unacked_for() is None
