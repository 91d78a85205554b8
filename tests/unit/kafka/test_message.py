"""Reading a message never raises, whatever its key and headers hold (written by kcat and by raw bytes)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from consumer.kafka.message import DamagedOrigin, origin_of
from tests.support import kafka

pytestmark = pytest.mark.kafka


@pytest.fixture
def topic(topics: kafka.Topics) -> str:
    return topics.make("headers")


def fetched(topic: str, count: int) -> Iterator[Message]:
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap(), "group.id": kafka.unique("read")})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got: list[Message] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < count:
            assert time.monotonic() < deadline, f"{len(got)} of {count}"
            got += [m for m in consumer.consume(count, 0.2) if m.error() is None]
        yield from got
    finally:
        consumer.close()


def kcat(topic: str, value: bytes, *headers: bytes, key: bytes | None = None) -> None:
    args = [b"kcat", b"-b", kafka.bootstrap().encode(), b"-P", b"-t", topic.encode()]
    args += [part for header in headers for part in (b"-H", header)]
    args += [b"-k", key] if key is not None else []
    subprocess.run(args, input=value, check=True, timeout=30)


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (.ci/run installs it)")
def test_header_keys_that_are_not_utf8_give_a_damaged_origin_with_the_raw_key(topic: str) -> None:
    kcat(topic, b"one bad key", b"ok=1", b"\xff\xfeab=2", b"late=3", key=b"\xff")
    kcat(topic, b"two bad keys", b"\xff=1", b"\xfe=2", b"nullvalue")
    kcat(topic, b"fine", b"nullvalue", b"k=" + b"v" * 100_000)
    first, second, third = (origin_of(m) for m in fetched(topic, 3))
    assert isinstance(first, DamagedOrigin) and first.raw_header_key == b"\xff\xfeab"
    assert (first.key, first.headers, first.offset) == (b"\xff", (), 0)
    assert isinstance(second, DamagedOrigin) and second.raw_header_key == b"\xff"
    assert not isinstance(third, DamagedOrigin)
    assert third.headers == (("nullvalue", b""), ("k", b"v" * 100_000))


def test_any_key_empty_and_null_headers_and_thousands_of_headers_are_read(topic: str) -> None:
    producer = Producer({"bootstrap.servers": kafka.bootstrap()})
    many: list[tuple[str, str | bytes | None]] = [(f"h{i}", bytes([i % 256])) for i in range(5000)]
    producer.produce(topic, None, key=bytes(range(256)), headers=[("", b"e"), ("n", None)])
    producer.produce(topic, b"", key=b"", headers=many)
    producer.produce(topic, b"x")
    assert producer.flush(30) == 0
    first, second, third = (origin_of(m) for m in fetched(topic, 3))
    assert (first.key, first.headers) == (bytes(range(256)), (("", b"e"), ("n", b"")))
    assert (second.key, second.headers) == (b"", tuple(many))
    assert (third.key, third.headers) == (None, ())


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (.ci/run installs it)")
def test_a_long_run_of_bad_header_keys_never_raises(topic: str) -> None:
    # Once CPython specialises the call, confluent's failed headers() returns with the error still pending.
    for i in range(40):
        if i % 2:
            kcat(topic, b"good %d" % i, "ключ".encode() + b"=\xff\xfe", b"nullvalue")
        else:
            kcat(topic, b"bad %d" % i, b"ok=1", b"\xff%d=2" % i)
    origins = [origin_of(m) for m in fetched(topic, 40)]
    for i, origin in enumerate(origins):
        if i % 2:
            assert not isinstance(origin, DamagedOrigin)
            assert origin.headers == (("ключ", b"\xff\xfe"), ("nullvalue", b""))
        else:
            assert isinstance(origin, DamagedOrigin) and origin.raw_header_key == b"\xff%d" % i
