"""Real-broker helpers for tests: unique topics, producing reviews, reading outputs until a condition holds."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def bootstrap() -> str:
    address = os.environ.get("KAFKA_BOOTSTRAP")
    if not address:
        raise RuntimeError(
            "KAFKA_BOOTSTRAP is not set: start the broker with `bash ops/kafka/kafka.sh start` and export the "
            "address it prints (the test command in the README does both)"
        )
    return address


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Topics:
    """Creates uniquely named topics and deletes them at the end."""

    def __init__(self, admin: AdminClient) -> None:
        self._admin = admin
        self.created: list[str] = []

    def make(self, prefix: str, partitions: int = 1) -> str:
        name = unique(prefix)
        futures = self._admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        futures[name].result(timeout=30)
        self.created.append(name)
        wait_for(lambda: _has_leaders(self._admin, name, partitions), 30, f"topic {name} has leaders")
        return name

    def cleanup(self) -> None:
        if self.created:
            futures = self._admin.delete_topics(self.created, operation_timeout=30)
            for future in futures.values():
                with suppress(KafkaException):
                    future.result(timeout=30)


def _has_leaders(admin: AdminClient, topic: str, partitions: int) -> bool:
    metadata = admin.list_topics(topic, timeout=5).topics.get(topic)
    if metadata is None or metadata.error is not None or len(metadata.partitions) != partitions:
        return False
    return all(p.leader >= 0 for p in metadata.partitions.values())


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll a condition until it holds; fail with ``what`` when the time is up."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for: {what}")
        time.sleep(interval_s)


def produce(
    topic: str,
    values: Iterable[bytes | None],
    keys: Iterable[bytes | None] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> int:
    producer = Producer({"bootstrap.servers": bootstrap(), "linger.ms": 20, "enable.idempotence": True})
    count = 0
    key_iter = iter(keys) if keys is not None else None
    for value in values:
        key = next(key_iter) if key_iter is not None else None
        kwargs: dict[str, Any] = {"value": value, "key": key, "headers": headers or []}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(60)
    assert left == 0, f"{left} messages not delivered to {topic}"
    return count


def produce_reviews(topic: str, reviews: Iterable[dict[str, Any]]) -> int:
    return produce(topic, (orjson.dumps(r) for r in reviews), None)


@contextmanager
def reader(topic: str) -> Iterator[Consumer]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap(),
            "group.id": unique("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    try:
        yield consumer
    finally:
        consumer.close()


def read_until(topic: str, condition: Callable[[list[Any]], bool], timeout_s: float) -> list[Any]:
    """Read messages from the start of ``topic`` until ``condition(messages)`` holds."""
    messages: list[Any] = []
    deadline = time.monotonic() + timeout_s
    with reader(topic) as consumer:
        while not condition(messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s reading {topic}: have {len(messages)} messages")
            for message in consumer.consume(1000, 0.2):
                if message.error() is None:
                    messages.append(message)
    return messages


def read_json(topic: str, count: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    messages = read_until(topic, lambda m: len(m) >= count, timeout_s)
    return [orjson.loads(m.value()) for m in messages]


def committed(group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap(), "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()
