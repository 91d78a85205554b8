"""Revoke commits every done watermark of the revoked partitions, including ones already stored."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewPartitions

from consumer.config import KafkaConfig, Settings, TopicsConfig
from consumer.kafka.source import KafkaSource
from consumer.records import TopicPartition as TP
from consumer.stream.pipeline import Parts, Pipeline
from tests.support import kafka


async def test_revoke_returns_watermarks_already_stored_but_maybe_not_committed() -> None:
    unused = cast(Any, None)  # revoke touches only the offset tracker
    pipeline = Pipeline(Settings(), Parts(sink=unused, scoring=unused, llm=unused, meter=unused, estimate=len))
    tp, other = ("reviews", 0), ("reviews", 1)
    await pipeline.on_assign([tp, other])
    for offset in range(5):
        pipeline.tracker.read(tp, offset)
        pipeline.tracker.done(tp, offset)
    pipeline.tracker.read(other, 0)
    assert pipeline.tracker.to_store() == {tp: 5, other: 0}  # the periodic store has handed these out already
    pipeline.tracker.done(other, 0)
    assert await pipeline.on_revoke([tp]) == {tp: 5}
    assert pipeline.tracker.owned() == [other]


class _Listener:
    """Owns nothing: records the assignment, commits nothing on revoke."""

    def __init__(self) -> None:
        self.owned: set[TP] = set()

    async def on_assign(self, tps: list[TP]) -> None:
        self.owned |= set(tps)

    async def on_revoke(self, tps: list[TP]) -> dict[TP, int]:
        self.owned -= set(tps)
        return {}

    async def on_lost(self, tps: list[TP]) -> None:
        self.owned -= set(tps)


async def _poll_until(source: KafkaSource, condition: Callable[[list[Any]], bool], seconds: float) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + seconds
    while not condition(got) and time.monotonic() < deadline:
        got += await source.poll(500, 0.2)
    return got


def _source(topic: str, group: str, listener: _Listener) -> KafkaSource:
    settings = Settings(kafka=KafkaConfig(bootstrap_servers=kafka.bootstrap(), group_id=group))
    return KafkaSource(settings.kafka, [topic], listener, callback_timeout_s=10)


@pytest.mark.kafka
async def test_pausing_before_any_assignment_pauses_what_is_assigned_next(topics: kafka.Topics) -> None:
    topic = topics.make("in", partitions=2)
    kafka.produce(topic, [b"{}"] * 20)
    listener = _Listener()
    source = _source(topic, kafka.unique("g"), listener)
    source.pause()  # nothing is assigned yet
    await source.start()
    try:
        assert not await _poll_until(source, lambda _got: False, 8), "fetched while paused"
        assert len(listener.owned) == 2
        source.resume()
        assert len(await _poll_until(source, lambda got: len(got) >= 20, 20)) == 20
    finally:
        await source.close()


@pytest.mark.kafka
async def test_a_partition_revoked_while_paused_is_fetched_again_when_it_comes_back(topics: kafka.Topics) -> None:
    topic, group = topics.make("in", partitions=2), kafka.unique("g")
    listener = _Listener()
    source = _source(topic, group, listener)
    await source.start()
    try:
        await _poll_until(source, lambda _got: len(listener.owned) == 2, 20)
        source.pause()
        other = Consumer(
            {"bootstrap.servers": kafka.bootstrap(), "group.id": group, "enable.auto.commit": False,
             "partition.assignment.strategy": "cooperative-sticky"}
        )  # fmt: skip
        other.subscribe([topic])
        deadline = time.monotonic() + 30
        while (len(listener.owned) != 1 or not other.assignment()) and time.monotonic() < deadline:
            other.poll(0.1)  # until the other consumer has taken one partition
            await source.poll(100, 0.1)
        assert len(listener.owned) == 1
        source.resume()  # while the other partition is someone else's
        await _poll_until(source, lambda _got: False, 1)
        other.close()  # it comes back, to a consumer that is no longer paused
        await _poll_until(source, lambda _got: len(listener.owned) == 2, 30)
        kafka.produce(topic, [b"{}"] * 10, partition=0)
        kafka.produce(topic, [b"{}"] * 10, partition=1)
        got = await _poll_until(source, lambda got: len(got) >= 20, 30)
        assert len(listener.owned) == 2
        assert sorted(m.partition() for m in got) == [0] * 10 + [1] * 10
    finally:
        await source.close()


class _ShareRecorder:
    def __init__(self) -> None:
        self.shares: list[float] = []

    def set_share(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"share must be in (0, 1], got {fraction!r}")  # as the rate limiter says
        self.shares.append(fraction)


@pytest.mark.kafka
async def test_partitions_added_to_the_input_topic_change_the_llm_share(
    topics: kafka.Topics, kafka_admin: AdminClient
) -> None:
    topic = topics.make("in", partitions=2)
    settings = Settings(
        kafka=KafkaConfig(bootstrap_servers=kafka.bootstrap(), group_id=kafka.unique("g")),
        topics=TopicsConfig(input=topic),
    )
    llm, unused = _ShareRecorder(), cast(Any, None)
    pipeline = Pipeline(settings, Parts(sink=unused, scoring=unused, llm=cast(Any, llm), meter=unused, estimate=len))
    pipeline._partitions = 2  # what run() counted at start
    await pipeline.on_assign([(topic, 0)])
    assert llm.shares == [0.5]
    kafka_admin.create_partitions([NewPartitions(topic, 4)])[topic].result(timeout=30)
    kafka.wait_for(lambda: len(kafka_admin.list_topics(topic, timeout=5).topics[topic].partitions) == 4, 30, "4")
    await pipeline.on_assign([(topic, 1), (topic, 2), (topic, 3)])  # more partitions than it knew of
    assert llm.shares[-1] == 1.0 and pipeline._partitions == 4
    await pipeline.on_revoke([(topic, 2), (topic, 3)])
    assert llm.shares[-1] == 0.5
    await pipeline.source.close()
