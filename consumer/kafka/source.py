"""The Kafka consumer behind one typed adapter.

The blocking client runs on its own single thread; nothing else calls ``consume`` or ``commit``. Rebalance
callbacks arrive on that thread inside ``consume``; they are handed to the event loop with
``run_coroutine_threadsafe`` and the thread waits for the answer, so a revoke can finish in-flight work and
commit it before the partition moves on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterable
from typing import Any, Protocol

import structlog
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumer.config import KafkaConfig, librdkafka_config
from consumer.errors import FatalError
from consumer.records import TopicPartition as TP

log = structlog.get_logger(__name__)


class RebalanceListener(Protocol):
    async def on_assign(self, tps: list[TP]) -> None: ...

    async def on_revoke(self, tps: list[TP]) -> dict[TP, int]: ...

    async def on_lost(self, tps: list[TP]) -> None: ...


def _tps(partitions: Iterable[TopicPartition]) -> list[TP]:
    return [(p.topic, p.partition) for p in partitions]


def _kafka_tps(offsets: dict[TP, int]) -> list[TopicPartition]:
    return [TopicPartition(t, p, o) for (t, p), o in offsets.items()]


class KafkaSource:
    """Consumes the input topics; offsets are stored only when the pipeline says they are done."""

    def __init__(self, kafka: KafkaConfig, topics: list[str], listener: RebalanceListener, callback_timeout_s: float):
        self._conf = librdkafka_config(kafka, "consumer")
        self._consumer = Consumer(self._conf, logger=None)
        self._topics = topics
        self._listener = listener
        self._callback_timeout_s = callback_timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")
        self._loop: asyncio.AbstractEventLoop | None = None
        # Pausing is a state of the consumer, not of the partitions assigned when it was asked for: what is
        # assigned later (or again) follows it. Applied on the consumer thread before each consume.
        self._want_paused = False
        self._cooperative = "cooperative" in str(self._conf.get("partition.assignment.strategy", ""))
        self._applied: tuple[frozenset[TP], bool] = (frozenset(), False)
        self.closed = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._consumer.subscribe(
            self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    async def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to ``max_messages`` messages, or fewer after ``timeout_s``. Errors that are not fatal are logged."""
        loop = asyncio.get_running_loop()
        messages: list[Message] = await loop.run_in_executor(self._executor, self._consume, max_messages, timeout_s)
        good = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            elif error.fatal():
                raise FatalError("consumer", f"{error.name()}: {error.str()}")
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer_error", code=error.name(), reason=error.str())
        return good

    def store(self, offsets: dict[TP, int]) -> None:
        """Store done watermarks; the auto-committer sends them. Non-blocking, safe from the loop."""
        if offsets:
            try:
                self._consumer.store_offsets(offsets=_kafka_tps(offsets))
            except KafkaException as exc:
                # A partition revoked a moment ago cannot be stored; its new owner re-reads from the last commit.
                log.info("store_offsets_skipped", reason=str(exc))

    async def commit(self, offsets: dict[TP, int]) -> None:
        """Synchronously commit these offsets (shutdown)."""
        if offsets:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._commit, offsets)

    def _commit(self, offsets: dict[TP, int]) -> None:
        try:
            self._consumer.commit(offsets=_kafka_tps(offsets), asynchronous=False)
        except KafkaException as exc:
            log.warning("commit_failed", reason=str(exc))

    def pause(self) -> None:
        """Stop fetching from every partition, those assigned later included, until ``resume``."""
        self._want_paused = True

    def resume(self) -> None:
        self._want_paused = False

    def _consume(self, max_messages: int, timeout_s: float) -> list[Message]:
        self._apply_pause()
        return list(self._consumer.consume(max_messages, timeout_s))

    def _apply_pause(self) -> None:
        """Pause or resume the whole assignment when it or the wanted state changed (consumer thread)."""
        assignment = self._consumer.assignment()
        state = (frozenset(_tps(assignment)), self._want_paused)
        if state == self._applied:
            return
        if assignment:
            # Both ways, every time: a partition paused, revoked and assigned again keeps librdkafka's pause flag.
            (self._consumer.pause if self._want_paused else self._consumer.resume)(assignment)
        self._applied = state

    def assignment(self) -> list[TP]:
        return _tps(self._consumer.assignment())

    def lag(self, stored: dict[TP, int]) -> dict[TP, int]:
        """Messages behind the high watermark per assigned partition, from client-cached watermarks."""
        lags: dict[TP, int] = {}
        for tp in self._consumer.assignment():
            low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            position = stored.get((tp.topic, tp.partition), OFFSET_INVALID)
            if high >= 0:
                lags[(tp.topic, tp.partition)] = max(0, high - (position if position >= 0 else max(low, 0)))
        return lags

    def partition_count(self, topic: str) -> int:
        metadata = self._consumer.list_topics(topic, timeout=5)
        return len(metadata.topics[topic].partitions) if topic in metadata.topics else 0

    async def close(self) -> None:
        """Leave the group (which runs the revoke callback one last time) and stop the thread."""
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._consumer.close)
        self._executor.shutdown(wait=True)

    # librdkafka calls these on the consumer thread, inside consume().
    def _bridge(self, coro: Any) -> Any:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=self._callback_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.warning("rebalance_callback_timeout", seconds=self._callback_timeout_s)
            return None

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions_assigned", partitions=[f"{t}/{p}" for t, p in _tps(partitions)])
        self._bridge(self._listener.on_assign(_tps(partitions)))
        try:
            # Assign here rather than after the callback, so the pause state holds before the first fetch: a
            # paused consumer stays paused, and a partition paused when it was revoked is fetched again.
            (consumer.incremental_assign if self._cooperative else consumer.assign)(partitions)
            (consumer.pause if self._want_paused else consumer.resume)(partitions)
        except KafkaException as exc:
            log.warning("assign_failed", reason=str(exc))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions_revoked", partitions=[f"{t}/{p}" for t, p in _tps(partitions)])
        offsets = self._bridge(self._listener.on_revoke(_tps(partitions))) or {}
        if offsets:
            try:
                consumer.store_offsets(offsets=_kafka_tps(offsets))
                consumer.commit(offsets=_kafka_tps(offsets), asynchronous=False)
                log.info("revoke_committed", offsets={f"{t}/{p}": o for (t, p), o in offsets.items()})
            except KafkaException as exc:
                log.warning("revoke_commit_failed", reason=str(exc))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("partitions_lost", partitions=[f"{t}/{p}" for t, p in _tps(partitions)])
        self._bridge(self._listener.on_lost(_tps(partitions)))
