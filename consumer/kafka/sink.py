"""The Kafka producer behind one typed adapter: idempotent, keyed, and never dropping a message silently.

A thread serves delivery reports; each report is handed back to the event loop. A failed delivery is
produced again (after a pause) until it succeeds or the service stops, so the offset of its input is
never stored while its output is missing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from confluent_kafka import KafkaError, Message, Producer

from consumer.aio import cancel_and_wait
from consumer.config import KafkaConfig, librdkafka_config

log = structlog.get_logger(__name__)

Headers = Sequence[tuple[str, bytes | None]]
OnDelivered = Callable[[], None]
_RETRY_PAUSE_S = 0.5


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish."""

    topic: str
    key: bytes | str | None
    value: bytes
    headers: Headers = ()


class KafkaSink:
    """Publishes to any topic; ``on_delivered`` runs on the event loop once the broker has the message."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self._producer = Producer(librdkafka_config(kafka, "producer"), logger=None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="kafka-producer", daemon=True)
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self.failed_deliveries = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def publish(self, out: Outgoing, on_delivered: OnDelivered) -> None:
        """Hand a message to the producer; waits (briefly, repeatedly) only while its local queue is full."""

        def report(err: KafkaError | None, _msg: Message) -> None:
            assert self._loop is not None
            if err is None:
                self._loop.call_soon_threadsafe(on_delivered)
            else:
                self._loop.call_soon_threadsafe(self._redeliver, out, on_delivered, err)

        while True:
            try:
                self._producer.produce(
                    out.topic, value=out.value, key=out.key, headers=list(out.headers), on_delivery=report
                )
                return
            except BufferError:
                await asyncio.sleep(0.005)  # the local queue is full; the report thread is draining it

    def _redeliver(self, out: Outgoing, on_delivered: OnDelivered, err: KafkaError) -> None:
        self.failed_deliveries += 1
        log.warning("delivery_failed_retrying", topic=out.topic, code=err.name(), reason=err.str())
        task = asyncio.get_running_loop().create_task(self._republish(out, on_delivered))
        self._retry_tasks.add(task)
        task.add_done_callback(self._retry_tasks.discard)

    async def _republish(self, out: Outgoing, on_delivered: OnDelivered) -> None:
        await asyncio.sleep(_RETRY_PAUSE_S)
        await self.publish(out, on_delivered)

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def pending(self) -> int:
        return len(self._producer)

    async def flush(self, timeout_s: float) -> int:
        """Wait until every message is delivered or the time is up; returns how many are still queued."""
        loop = asyncio.get_running_loop()
        left: int = await loop.run_in_executor(None, self._producer.flush, timeout_s)
        return left

    async def close(self, timeout_s: float) -> None:
        left = await self.flush(timeout_s)
        if left:
            log.error("producer_closed_with_undelivered", count=left)
        self._stop.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._thread.join)
        await loop.run_in_executor(None, self._producer.close)  # now, not whenever the GC gets to it
        await cancel_and_wait(self._retry_tasks)
