"""The one whole-topic reader and the topic admin against the real broker."""

from __future__ import annotations

import time

import pytest

from consumer.kafka.admin import TopicAdmin, TopicAdminError, TopicSpec
from consumer.kafka.reader import TopicReader, TopicReadError, read_topics
from tests.support import kafka

pytestmark = pytest.mark.kafka


def _conf() -> dict[str, str]:
    return {"bootstrap.servers": kafka.bootstrap()}


def test_admin_creates_describes_and_deletes_a_topic() -> None:
    admin = TopicAdmin(_conf())
    name = kafka.unique("admin")
    admin.create([TopicSpec(name, partitions=3, config={"max.message.bytes": "20000"})])
    try:
        assert admin.partitions(name) == 3 and admin.has_leaders(name, 3)
        assert admin.topic_config(name)["max.message.bytes"] == "20000"
        admin.create([TopicSpec(name, partitions=3)], exist_ok=True)  # already there: fine when asked
        with pytest.raises(TopicAdminError, match=name):
            admin.create([TopicSpec(name, partitions=3)])
    finally:
        admin.delete([name])
    kafka.wait_for(lambda: admin.partitions(name) is None, 30, "topic deleted")


def test_reader_reads_every_partition_to_the_watermarks_seen_at_open(topics: kafka.Topics) -> None:
    topic = topics.make("reader", partitions=3)
    for partition in range(3):
        kafka.produce(topic, [f"p{partition}-{i}".encode() for i in range(50)], partition=partition)
    with TopicReader(_conf(), [topic]) as reader:
        kafka.produce(topic, [b"late"], partition=0)  # after open: beyond the end it reads to
        got = reader.read_to_end(60)
        assert reader.caught_up()
    assert len(got) == 150 and b"late" not in {m.value for m in got}
    assert {(m.partition, m.value) for m in got} == {(p, f"p{p}-{i}".encode()) for p in range(3) for i in range(50)}
    assert all(m.timestamp_ms is not None for m in got)
    assert len(read_topics(_conf(), [topic], 60)) == 151


def test_reader_starts_at_a_moment_and_reads_an_empty_topic_at_once(topics: kafka.Topics) -> None:
    topic = topics.make("since")
    kafka.produce(topic, [b"old"] * 5)
    kafka.wait_for(lambda: len(read_topics(_conf(), [topic], 30)) == 5, 30, "old messages readable")
    since = int(time.time() * 1000) + 1
    kafka.wait_for(lambda: int(time.time() * 1000) > since + 5, 5, "the clock moved past the cut")
    kafka.produce(topic, [b"new"] * 3)
    with TopicReader(_conf(), [topic], since_ms=since) as reader:
        assert [m.value for m in reader.read_to_end(60)] == [b"new"] * 3
    empty = topics.make("empty")
    assert read_topics(_conf(), [empty], 30) == []


def test_a_missing_topic_is_a_clear_error() -> None:
    with pytest.raises(TopicReadError, match="no-such-topic"):
        TopicReader(_conf(), [kafka.unique("no-such-topic")])
