"""The one reader of whole topics: from the start (or a moment) to the high watermarks seen when it opened.

It assigns partitions instead of joining a group, so it commits nothing and makes nobody rebalance. The
distill command, ``shunt report``/``top``, the demo's tally, the benchmarks and the tests all read with it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, Message, TopicPartition

from consumer.errors import ShuntError

_META_TIMEOUT_S = 15.0
_GONE = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError._UNKNOWN_TOPIC)
log = structlog.get_logger(__name__)


class TopicReadError(ShuntError):
    """A topic cannot be read: not found, or the broker refused or timed out."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """One message read by :class:`TopicReader`; ``timestamp_ms`` is None when the broker has none."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None


class TopicReader:
    """Reads every partition of ``topics`` without a group; see the module docstring.

    ``conf`` is a librdkafka dict (at least ``bootstrap.servers``); ``since_ms`` starts each partition at
    the first message appended at or after that time. ``poll`` goes on past the end (to follow a topic);
    ``caught_up`` says when everything that was there at the start has been read."""

    def __init__(self, conf: Mapping[str, Any], topics: Sequence[str], *, since_ms: int | None = None) -> None:
        settings = {k: v for k, v in conf.items() if k not in ("enable.auto.offset.store", "group.instance.id")}
        # EOF events mark a partition read even when its last offsets are transaction markers or compacted away.
        settings |= {
            "group.id": f"shunt-reader-{uuid.uuid4().hex[:10]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
        self._consumer = Consumer(settings, logger=None)
        self._next: dict[tuple[str, int], int] = {}
        self._end: dict[tuple[str, int], int] = {}
        self._failed: TopicReadError | None = None
        try:
            self._consumer.assign([tp for topic in topics for tp in self._start(topic, since_ms)])
        except BaseException:
            self._consumer.close()
            raise

    def _start(self, topic: str, since_ms: int | None) -> list[TopicPartition]:
        metadata = self._consumer.list_topics(topic, timeout=_META_TIMEOUT_S).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            why = metadata.error if metadata is not None and metadata.error is not None else "not found"
            raise TopicReadError(f"cannot read topic {topic!r}: {why}")
        tps = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
        if since_ms is not None:
            wanted = [TopicPartition(topic, tp.partition, since_ms) for tp in tps]
            tps = self._consumer.offsets_for_times(wanted, _META_TIMEOUT_S)
        for tp in tps:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=_META_TIMEOUT_S)
            key = (topic, tp.partition)
            self._end[key] = high
            self._next[key] = tp.offset if tp.offset >= 0 else (high if since_ms is not None else low)
            tp.offset = self._next[key]
        return tps

    @property
    def ends(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> high watermark when the reader opened."""
        return dict(self._end)

    def poll(self, timeout_s: float, max_messages: int = 1000) -> list[Fetched]:
        """The next messages, at most ``max_messages``; an empty list when none came within ``timeout_s``.

        A transient broker error is logged and reading goes on (librdkafka retries by itself); a fatal one
        (or a topic gone) raises :class:`TopicReadError`, after the messages read before it are returned."""
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        out = []
        for message in self._consumer.consume(max_messages, timeout_s):
            error = message.error()
            if error is None:
                fetched = _fetched(message)
                self._next[(fetched.topic, fetched.partition)] = fetched.offset + 1
                out.append(fetched)
            elif error.code() == KafkaError._PARTITION_EOF:
                key = (message.topic() or "", message.partition() or 0)
                self._next[key] = max(self._next.get(key, 0), message.offset() or 0)
            elif error.fatal() or error.code() in _GONE:
                self._failed = TopicReadError(f"reading {message.topic()} failed: {error.str()}")
                break
            else:
                log.warning("topic_read_error", topic=message.topic(), error=error.str(), retriable=error.retriable())
        if self._failed is not None and not out:
            failed, self._failed = self._failed, None
            raise failed
        return out

    def caught_up(self) -> bool:
        """Everything that was on the topics when the reader opened has been read."""
        return all(self._next[tp] >= end for tp, end in self._end.items())

    def mark_end(self) -> None:
        """Take the high watermarks now as the end ``caught_up`` measures (a follower catching up at last)."""
        for topic, partition in self._end:
            tp = TopicPartition(topic, partition)
            self._end[(topic, partition)] = self._consumer.get_watermark_offsets(tp, timeout=_META_TIMEOUT_S)[1]

    def read_to_end(self, timeout_s: float = 120.0) -> list[Fetched]:
        """Every message up to the high watermarks seen at the start (later ones are left out)."""
        deadline = time.monotonic() + timeout_s
        out: list[Fetched] = []
        while not self.caught_up():
            if time.monotonic() > deadline:
                behind = sorted(f"{t}/{p}" for (t, p), end in self._end.items() if self._next[(t, p)] < end)
                raise TopicReadError(f"timed out after {timeout_s}s reading; not at the end: {', '.join(behind)}")
            out.extend(m for m in self.poll(0.5, 10_000) if m.offset < self._end[(m.topic, m.partition)])
        return out

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_topics(conf: Mapping[str, Any], topics: Iterable[str], timeout_s: float = 120.0) -> list[Fetched]:
    """Every message now in ``topics``, read from the start to the high watermarks."""
    with TopicReader(conf, list(topics)) as reader:
        return reader.read_to_end(timeout_s)


def _fetched(message: Message) -> Fetched:
    kind, stamp = message.timestamp()
    key = message.key()
    return Fetched(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=key.encode() if isinstance(key, str) else key,
        value=message.value(),
        timestamp_ms=None if kind == TIMESTAMP_NOT_AVAILABLE else stamp,
    )
