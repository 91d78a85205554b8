"""The sink against the real broker: sizes checked before producing, and every produce error classified.

Too-large outputs drop their copied headers, dead letters too large are cut to the DLQ topic's own
``max.message.bytes``, a record the broker refuses becomes a dead letter, and an unknown topic is fatal.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from consumer import contracts
from consumer.config import KafkaConfig
from consumer.kafka.admin import TopicSpec
from consumer.kafka.sink import HEADERS_DROPPED, KafkaSink, Outgoing
from consumer.records import Origin
from consumer.stream import outputs
from tests.support import kafka
from tests.unit.observe.fakes import eventually

pytestmark = pytest.mark.kafka
ORIGIN = Origin("reviews", 0, 5, key=b"k", headers=(("trace", b"t"),))


@pytest.fixture
def made(topics: kafka.Topics) -> Iterator[Any]:
    def make(prefix: str, **config: str) -> str:
        name = kafka.unique(prefix)
        kafka.topic_admin().create([TopicSpec(name, config=config)])
        topics.created.append(name)
        return name

    yield make


async def started(dlq: str | None = None, **producer: str | int) -> KafkaSink:
    sink = KafkaSink(KafkaConfig(bootstrap_servers=kafka.bootstrap(), producer=producer))
    await sink.start()
    if dlq is not None:
        sink.rescue_with(outputs.DeadLetters(dlq, "i-1"))
    return sink


@pytest.fixture
async def closing() -> AsyncIterator[list[KafkaSink]]:
    sinks: list[KafkaSink] = []
    yield sinks
    for sink in sinks:
        await sink.close(10)


def read(topic: str, count: int) -> list[Any]:
    """The first ``count`` messages of partition 0, with their headers (no group joined)."""
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap(), "group.id": kafka.unique("read")})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    messages: list[Any] = []
    deadline = time.monotonic() + 30
    try:
        while len(messages) < count:
            assert time.monotonic() < deadline, f"read {len(messages)} of {count} from {topic}"
            messages += [m for m in consumer.consume(count, 0.2) if m.error() is None]
    finally:
        consumer.close()
    return messages


async def test_an_output_too_large_for_its_headers_goes_without_them(made: Any, closing: list[KafkaSink]) -> None:
    out = made("out")
    closing.append(sink := await started())
    delivered: list[int] = []
    headers = [("big", b"h" * 600_000), ("more", b"m" * 500_000), ("shunt-source", b"small")]
    await sink.publish(Outgoing(out, "r-1", b'{"id": "r-1"}', headers), lambda: delivered.append(1))
    await eventually(lambda: delivered == [1], 30, "the output is delivered")
    (message,) = read(out, 1)
    assert dict(message.headers()) == {"shunt-source": b"small", HEADERS_DROPPED: b"2"}
    assert (sink.headers_dropped, sink.fatal) == (1, None)


async def test_a_topic_with_a_small_limit_takes_many_records_that_fit_it(made: Any, closing: list[KafkaSink]) -> None:
    # librdkafka fails a whole batch the broker finds too large; the topic gets batches that fit it.
    small = made("dlq", **{"max.message.bytes": "20000"})
    closing.append(sink := await started())
    assert (await sink.learn_limits([small]))[small] == 20_000
    delivered: list[int] = []
    for _ in range(40):
        await sink.publish(
            Outgoing(small, None, os.urandom(5_000)), lambda: delivered.append(1)
        )  # lz4 cannot shrink it
    await eventually(lambda: len(delivered) == 40, 30, "every record is delivered")
    assert (sink.failed_deliveries, sink.fatal) == (0, None)


async def test_a_dead_letter_too_large_for_the_dlq_is_cut_to_fit(made: Any, closing: list[KafkaSink]) -> None:
    dlq = made("dlq", **{"max.message.bytes": "20000"})
    closing.append(sink := await started(dlq))
    original = orjson.dumps({"id": "x", "text": "b" * 30_000})
    letter = outputs.dlq("text_too_long", "long", ORIGIN, original, "i-1")
    delivered: list[int] = []
    await sink.publish(Outgoing(dlq, ORIGIN.key, contracts.dumps(letter), ORIGIN.headers), lambda: delivered.append(1))
    await eventually(lambda: delivered == [1], 30, "the dead letter is delivered")
    (message,) = read(dlq, 1)
    got = orjson.loads(message.value())
    contracts.validate("dlq", got)
    assert (got["truncated"], got["original_size"], got["reason"]) == (True, len(original), "text_too_long")
    assert len(message.value()) < 20_000
    assert (sink.rescued, sink.fatal) == (1, None)


async def test_a_record_the_broker_refuses_is_dead_lettered(made: Any, closing: list[KafkaSink]) -> None:
    compacted, dlq = made("out", **{"cleanup.policy": "compact"}), made("dlq")
    closing.append(sink := await started(dlq))
    labeled = orjson.dumps({"schema_version": "labeled.v1", "id": "r-1", "input": outputs.position(ORIGIN)})
    delivered: list[int] = []
    await sink.publish(Outgoing(compacted, None, labeled), lambda: delivered.append(1))  # null key: INVALID_RECORD
    await eventually(lambda: delivered == [1], 30, "the dead letter stands for the refused output")
    (message,) = read(dlq, 1)
    got = orjson.loads(message.value())
    assert (got["reason"], got["input"], got["review_id"]) == ("output_refused", outputs.position(ORIGIN), "r-1")
    assert "INVALID_RECORD" in got["detail"]
    assert (sink.rescued, sink.fatal) == (1, None)


async def test_a_missing_topic_is_fatal_and_nothing_is_reported_delivered(closing: list[KafkaSink]) -> None:
    missing = kafka.unique("missing")
    closing.append(sink := await started(None, **{"topic.metadata.propagation.max.ms": 1000}))
    delivered: list[int] = []
    for _ in range(3):
        await sink.publish(Outgoing(missing, None, b"{}"), lambda: delivered.append(1))
    await eventually(sink.fatal_event.is_set, 30, "the sink declares the error fatal")
    assert sink.fatal is not None and sink.fatal.what == missing
    assert "UNKNOWN_TOPIC" in sink.fatal.detail
    await eventually(lambda: sink.parked == 3, 30, "every failed record is parked, not retried")
    assert (delivered, sink.retries) == ([], 0)


async def test_a_broker_that_is_down_is_retried_with_backoff_and_counted(closing: list[KafkaSink]) -> None:
    sink = KafkaSink(KafkaConfig(bootstrap_servers="127.0.0.1:1", producer={"message.timeout.ms": 300}))
    sink._describe = dict.fromkeys  # type: ignore[method-assign,assignment]  # no broker to ask
    await sink.start()
    closing.append(sink)
    delivered: list[int] = []
    await sink.publish(Outgoing("anything", None, b"{}"), lambda: delivered.append(1))
    await eventually(lambda: sink.retries >= 3, 30, "three retries")
    assert (delivered, sink.fatal) == ([], None)


async def test_a_record_produce_itself_refuses_is_dead_lettered(made: Any, closing: list[KafkaSink]) -> None:
    # produce() raises MSG_SIZE_TOO_LARGE synchronously (a KafkaException, not a BufferError) when a record is over
    # message.max.bytes; the size check normally stops it first, so pretend the limit is larger than it is.
    out, dlq = made("out"), made("dlq")
    closing.append(sink := await started(dlq))
    await sink.learn_limits([out, dlq])
    sink._limits[out] = 10_000_000
    labeled = orjson.dumps({"schema_version": "labeled.v1", "id": "r-1", "input": outputs.position(ORIGIN)})
    delivered: list[int] = []
    await sink.publish(Outgoing(out, "r-1", labeled + b" " * 1_200_000), lambda: delivered.append(1))
    await eventually(lambda: delivered == [1], 30, "the dead letter stands for the refused output")
    (message,) = read(dlq, 1)
    got = orjson.loads(message.value())
    assert (got["reason"], got["truncated"], got["original_size"]) == ("output_refused", True, len(labeled) + 1_200_000)
    assert "MSG_SIZE_TOO_LARGE" in got["detail"]
    assert (sink.rescued, sink.fatal) == (1, None)


async def test_a_fatal_client_error_is_fatal_for_the_service(closing: list[KafkaSink]) -> None:
    closing.append(sink := await started())
    sink._on_client_error(KafkaError(KafkaError._FATAL, "idempotent producer fenced", fatal=True))  # librdkafka's cb
    await eventually(sink.fatal_event.is_set, 10, "the sink declares the error fatal")
    assert sink.fatal is not None and (sink.fatal.what, sink.fatal.detail) == (
        "producer",
        "_FATAL: idempotent producer fenced",
    )


async def test_a_rescue_that_raises_is_fatal_not_a_message_left_undone(made: Any, closing: list[KafkaSink]) -> None:
    compacted, dlq = made("out", **{"cleanup.policy": "compact"}), made("dlq")
    closing.append(sink := await started(dlq))

    def broken(*_: Any) -> Outgoing:
        raise RuntimeError("rescuer bug")

    sink._rescuer = type("Broken", (), {"topic": dlq, "__call__": staticmethod(broken)})()  # type: ignore[assignment]
    delivered: list[int] = []
    await sink.publish(Outgoing(compacted, None, b"{}"), lambda: delivered.append(1))  # null key: INVALID_RECORD
    await eventually(sink.fatal_event.is_set, 30, "the sink declares the dead task fatal")
    assert sink.fatal is not None and "rescuer bug" in sink.fatal.detail and delivered == []


async def test_many_messages_are_each_reported_once_on_the_loop_in_order(made: Any, closing: list[KafkaSink]) -> None:
    topic = made("burst")
    closing.append(sink := await started())
    await sink.learn_limits([topic])
    loop_thread, seen = threading.get_ident(), []

    def delivered(i: int) -> Callable[[], None]:
        return lambda: seen.append((i, threading.get_ident()))

    await sink.publish_all([(Outgoing(topic, str(i), b"{}"), delivered(i)) for i in range(2_000)])
    await eventually(lambda: len(seen) >= 2_000, 30, "every delivery reported")
    assert [i for i, _ in seen] == list(range(2_000))  # one partition: the broker's order is ours
    assert {thread for _, thread in seen} == {loop_thread}
    assert len(read(topic, 2_000)) == 2_000


async def test_a_delivery_callback_that_raises_is_fatal_and_the_others_still_run(
    made: Any, closing: list[KafkaSink]
) -> None:
    topic = made("raises")
    closing.append(sink := await started())
    seen: list[int] = []

    def broken() -> None:
        raise RuntimeError("callback bug")

    items = [(Outgoing(topic, str(i), b"{}"), (lambda i=i: seen.append(i)) if i != 3 else broken) for i in range(8)]
    await sink.publish_all(items)
    await eventually(lambda: len(seen) == 7, 30, "the other callbacks ran")
    assert sink.fatal is not None and "callback bug" in sink.fatal.detail
    assert sorted(seen) == [0, 1, 2, 4, 5, 6, 7]
