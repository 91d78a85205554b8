"""Real-broker helpers for tests: unique topics, producing reviews, reading outputs until a condition holds.

Topics are made and deleted with consumer.kafka.admin and read with consumer.kafka.reader (no group joins),
the same code the service, the tools and the benchmarks use."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.kafka.admin import TopicAdmin, TopicSpec
from consumer.kafka.reader import Fetched, TopicReader


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


def topic_admin() -> TopicAdmin:
    return TopicAdmin({"bootstrap.servers": bootstrap()})


class Topics:
    """Creates uniquely named topics and deletes them at the end.

    Takes a TopicAdmin; a plain AdminClient (older call sites) is accepted, and then one is made on
    ``bootstrap()``, where that client points too."""

    def __init__(self, admin: TopicAdmin | AdminClient | None = None) -> None:
        self._admin = admin if isinstance(admin, TopicAdmin) else topic_admin()
        self.created: list[str] = []

    def make(self, prefix: str, partitions: int = 1) -> str:
        """A new topic, every partition with a leader."""
        name = unique(prefix)
        self._admin.create([TopicSpec(name, partitions)])
        self.created.append(name)
        return name

    def cleanup(self) -> None:
        self._admin.delete(self.created)


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


@dataclass(frozen=True, slots=True)
class Received:
    """A message ``read_until`` returns: a Fetched behind the accessors of confluent's Message that tests call."""

    fetched: Fetched

    def topic(self) -> str:
        return self.fetched.topic

    def partition(self) -> int:
        return self.fetched.partition

    def offset(self) -> int:
        return self.fetched.offset

    def key(self) -> bytes | None:
        return self.fetched.key

    def value(self) -> bytes | None:
        return self.fetched.value


@contextmanager
def reader(topic: str) -> Iterator[TopicReader]:
    """Reads ``topic`` from the start, on past its end, without joining a group."""
    with TopicReader({"bootstrap.servers": bootstrap()}, [topic]) as topic_reader:
        yield topic_reader


def read_until(topic: str, condition: Callable[[list[Received]], bool], timeout_s: float) -> list[Received]:
    """Read messages from the start of ``topic`` until ``condition(messages)`` holds."""
    messages: list[Received] = []
    deadline = time.monotonic() + timeout_s
    with reader(topic) as topic_reader:
        while not condition(messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s reading {topic}: have {len(messages)} messages")
            messages.extend(Received(fetched) for fetched in topic_reader.poll(0.2))
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
