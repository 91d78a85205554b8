"""The Kafka producer behind one typed adapter: idempotent, keyed, and never dropping a message silently.

A thread serves delivery reports; they are handed back to the event loop in bursts
(:mod:`consumer.kafka.reports`). Every failure, whether
``produce()`` raised it or a delivery report carried it, goes through one policy
(:func:`consumer.errors.on_produce_error`):

- retriable (queue full, timeouts, leader moves, broker down): produced again after a backoff, for as long as
  it takes, counted in ``retries``;
- permanent for the message (too large, invalid record): handed to the rescuer, which returns a dead letter
  that fits; the dead letter's delivery finishes the message instead;
- permanent for the service (unknown topic, authorisation, a fatal idempotent-producer error): ``fatal`` is
  set, ``fatal_event`` fires, one ``fatal`` event is logged, and the message is parked (never re-produced, never
  reported delivered), so the offset of its input is never stored.

Sizes are checked before producing, against the producer's ``message.max.bytes`` and each topic's
``max.message.bytes`` (read once per topic, at start via :meth:`KafkaSink.learn_limits` or at its first
message). A message too big only because of the headers it copies goes without them, with a
``shunt-headers-dropped`` header saying how many were left out. A topic whose limit is below the producer's
``batch.size`` gets a producer of its own whose batches fit it (librdkafka fails a whole batch the broker
finds too large, not only the message that made it so).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from consumer.aio import cancel_and_wait
from consumer.config import KafkaConfig, librdkafka_config
from consumer.errors import FatalError, ProduceAction, on_produce_error
from consumer.kafka.admin import TopicAdmin, TopicAdminError
from consumer.kafka.reports import DeliveryReports
from consumer.records import Origin

log = structlog.get_logger(__name__)

Headers = Sequence[tuple[str, bytes | None]]
OnDelivered = Callable[[], None]
HEADERS_DROPPED = "shunt-headers-dropped"
DEFAULT_MAX_BYTES = 1_000_000  # librdkafka's message.max.bytes and batch.size defaults
FRAMING_BYTES = 512  # record batch and record framing, generously (the broker counts the whole batch)
PER_HEADER_BYTES = 12  # varint lengths of one header's key and value
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.1, 5.0
_LOG_EVERY_S = 5.0
_KEPT_HEADER_BYTES = 1024  # the service's own shunt-* headers survive a drop when they are this small


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish. ``origin`` (optional) is the input it answers, for a dead letter if refused."""

    topic: str
    key: bytes | str | None
    value: bytes
    headers: Headers = ()
    origin: Origin | None = None


class Rescuer(Protocol):
    """Turns a message refused for good into a dead letter on ``topic`` of at most ``room`` bytes, or None."""

    @property
    def topic(self) -> str: ...

    def __call__(self, out: Outgoing, reason: str, room: int) -> Outgoing | None: ...


def record_size(out: Outgoing) -> int:
    """A safe upper bound of the bytes the broker counts for ``out`` (uncompressed, with framing)."""
    key = out.key.encode() if isinstance(out.key, str) else (out.key or b"")
    headers = sum(len(k.encode("utf-8", "surrogateescape")) + len(v or b"") + PER_HEADER_BYTES for k, v in out.headers)
    return FRAMING_BYTES + len(key) + len(out.value) + headers


@dataclass(slots=True)
class _Send:
    out: Outgoing
    on_delivered: OnDelivered
    reports: DeliveryReports[tuple[_Send, KafkaError | None]]
    attempt: int = 0
    rescued: bool = False  # already a replacement: refused again means the service cannot record the failure

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        """librdkafka's delivery report for this message (on the thread that polls the producer)."""
        self.reports.put((self, err))


class KafkaSink:
    """Publishes to any topic; ``on_delivered`` runs on the event loop once the broker has the message."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self._conf = librdkafka_config(kafka, "producer")
        self._admin_conf = librdkafka_config(kafka, "admin")
        self._producer = Producer(self._conf | {"error_cb": self._on_client_error}, logger=None)
        self._narrow: dict[str, Producer] = {}  # topics whose max.message.bytes is below the batch size
        self._max_bytes = int(self._conf.get("message.max.bytes", DEFAULT_MAX_BYTES))
        self._batch_bytes = int(self._conf.get("batch.size", DEFAULT_MAX_BYTES))
        self._limits: dict[str, int] = {}
        self._learning = asyncio.Lock()
        self._rescuer: Rescuer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: DeliveryReports[tuple[_Send, KafkaError | None]] = DeliveryReports(self._delivered)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="kafka-producer", daemon=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self._logged: dict[tuple[str, str], float] = {}
        self.fatal: FatalError | None = None
        self.fatal_event = asyncio.Event()
        self.failed_deliveries = 0  # every failed produce or delivery, whatever the policy said
        self.retries = 0  # produced again after a retriable failure
        self.queue_full = 0  # publishes that had to wait for room in the local queue
        self.rescued = 0  # refused for good and replaced by a dead letter
        self.headers_dropped = 0  # published without the headers they copied, which would not fit
        self.parked = 0  # not re-produced because the service has a fatal error

    # -- set-up ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = self._reports.loop = asyncio.get_running_loop()
        self._thread.start()

    def rescue_with(self, rescuer: Rescuer) -> None:
        """Who turns a message refused for good into a dead letter; without one, such a refusal is fatal."""
        self._rescuer = rescuer

    async def learn_limits(self, topics: Sequence[str]) -> dict[str, int]:
        """Read each topic's ``max.message.bytes`` (once); returns the size limit used for every topic."""
        todo = [t for t in dict.fromkeys(topics) if t not in self._limits]
        if todo:
            found = await asyncio.get_running_loop().run_in_executor(None, self._describe, todo)
            for topic, topic_max in found.items():
                self._set_limit(topic, topic_max)
        return {t: self._limits[t] for t in topics}

    async def limit(self, topic: str) -> int:
        """The largest record ``topic`` takes from this producer, in bytes (learned at its first use)."""
        if topic not in self._limits:
            async with self._learning:
                await self.learn_limits([topic])
        return self._limits[topic]

    def _describe(self, topics: list[str]) -> dict[str, int | None]:
        admin = TopicAdmin(self._admin_conf)
        found: dict[str, int | None] = {}
        for topic in topics:
            try:
                found[topic] = int(admin.topic_config(topic, timeout_s=10).get("max.message.bytes", "0")) or None
            except (TopicAdminError, KafkaException, ValueError) as exc:
                log.warning("topic_limit_unknown", topic=topic, reason=str(exc), assumed=self._max_bytes)
                found[topic] = None
        return found

    def _set_limit(self, topic: str, topic_max: int | None) -> None:
        limit = min(self._max_bytes, topic_max or self._max_bytes)
        self._limits[topic] = limit
        if topic_max is not None and topic_max < self._batch_bytes:
            batch = max(1, limit - FRAMING_BYTES)
            conf = self._conf | {
                "batch.size": batch,
                "message.max.bytes": max(1000, limit),
                "error_cb": self._on_client_error,
            }
            self._narrow[topic] = Producer(conf, logger=None)
            log.info("topic_limit", topic=topic, max_message_bytes=topic_max, own_producer_batch_bytes=batch)

    # -- publishing ------------------------------------------------------------------------------------
    async def publish(self, out: Outgoing, on_delivered: OnDelivered) -> None:
        """Hand a message to the producer; waits only while its local queue is full (or its topic's limit is
        read, once). Never raises for a produce error: the policy handles it."""
        send = _Send(out, on_delivered, self._reports)
        if not self._produce_now(send):
            await self._send(send)

    async def publish_all(self, items: Sequence[tuple[Outgoing, OnDelivered]]) -> None:
        """:meth:`publish` for many messages, in order: those that can go at once (their topic's limit known,
        room in the local queue) go without a coroutine each."""
        for out, on_delivered in items:
            send = _Send(out, on_delivered, self._reports)
            if not self._produce_now(send):
                await self._send(send)

    def _produce_now(self, send: _Send) -> bool:
        """Produce ``send`` if nothing stands in the way; False leaves it to the slow path (:meth:`_send`)."""
        limit = self._limits.get(send.out.topic)
        return limit is not None and record_size(send.out) <= limit and self._try_produce(send)

    async def _send(self, send: _Send) -> None:
        limit = await self.limit(send.out.topic)
        if record_size(send.out) > limit:
            send.out = self._without_headers(send.out)
            if (size := record_size(send.out)) > limit:
                self._refused(send, "MSG_SIZE_TOO_LARGE", f"a record of {size} bytes; {send.out.topic} takes {limit}")
                return
        await self._produce(send)

    def _without_headers(self, out: Outgoing) -> Outgoing:
        if not out.headers:
            return out
        own = [(k, v) for k, v in out.headers if k.startswith("shunt-")]
        if sum(len(k) + len(v or b"") for k, v in own) > _KEPT_HEADER_BYTES:
            own = []
        dropped = len(out.headers) - len(own)
        self.headers_dropped += 1
        log.warning("headers_dropped", topic=out.topic, count=dropped, reason="the record would be too large")
        return replace(out, headers=(*own, (HEADERS_DROPPED, str(dropped).encode())))

    async def _produce(self, send: _Send) -> None:
        waited = False
        while not self._try_produce(send):
            if not waited:
                waited, self.queue_full = True, self.queue_full + 1
            await asyncio.sleep(0.005)  # the local queue is full; the report thread is draining it

    def _try_produce(self, send: _Send) -> bool:
        """One ``produce()``: False when the local queue is full. A message produce() refuses itself
        (MSG_SIZE_TOO_LARGE, ...) goes to the policy and counts as handled."""
        out = send.out
        producer = self._narrow.get(out.topic, self._producer)
        try:
            producer.produce(out.topic, value=out.value, key=out.key, headers=list(out.headers), on_delivery=send)
        except BufferError:
            return False
        except KafkaException as exc:
            self._failed(send, exc.args[0])
        return True

    def _delivered(self, batch: list[tuple[_Send, KafkaError | None]]) -> None:
        """On the event loop: a burst of delivery reports. A callback that raises is a bug that would leave
        its message undone forever: fatal for the service (said once), and the rest of the burst still runs."""
        for send, err in batch:
            try:
                if err is None:
                    send.on_delivered()
                else:
                    self._failed(send, err)
            except Exception as exc:
                log.exception("delivery_callback_failed", topic=send.out.topic)
                self._declare_fatal("sink", type(exc).__name__, repr(exc))

    # -- the produce-error policy ----------------------------------------------------------------------
    def _failed(self, send: _Send, err: Any) -> None:
        """Runs on the event loop for every failed produce or delivery."""
        self.failed_deliveries += 1
        code, reason, fatal = _describe_error(err)
        if self.fatal is not None:
            self.parked += 1  # the service is stopping: nothing is re-produced, nothing reported delivered
            return
        action = on_produce_error(code, fatal=fatal)
        if action is ProduceAction.FATAL:
            self._declare_fatal(send.out.topic, code, reason)
        elif action is ProduceAction.DEAD_LETTER:
            self._refused(send, code, reason)
        else:
            self.retries += 1
            self._log_retry(send, code, reason)
            self._spawn(self._retry(send))

    def _log_retry(self, send: _Send, code: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._logged.get((send.out.topic, code), -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged[(send.out.topic, code)] = now
            log.warning(
                "delivery_failed_retrying", topic=send.out.topic, code=code, reason=reason, retries=self.retries
            )

    async def _retry(self, send: _Send) -> None:
        await asyncio.sleep(min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2**send.attempt))  # backoff, not a sync
        send.attempt += 1
        if self.fatal is None:
            await self._produce(send)
        else:
            self.parked += 1

    def _refused(self, send: _Send, code: str, reason: str) -> None:
        """Permanent for this message: publish the rescuer's dead letter in its place."""
        if send.rescued or self._rescuer is None:
            self._declare_fatal(send.out.topic, code, reason)
            return
        self._spawn(self._rescue(send, self._rescuer, f"{code}: {reason}"))

    async def _rescue(self, send: _Send, rescuer: Rescuer, reason: str) -> None:
        replacement = rescuer(send.out, reason, await self.limit(rescuer.topic) - FRAMING_BYTES)
        if replacement is None:
            self._declare_fatal(send.out.topic, "REFUSED", f"{reason} (and no dead letter can stand for it)")
            return
        self.rescued += 1
        log.warning("refused_dead_lettered", topic=send.out.topic, reason=reason, dlq=replacement.topic)
        await self._send(_Send(replacement, send.on_delivered, self._reports, rescued=True))

    def _on_client_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (on the report thread): a fatal one (the idempotent producer cannot go
        on) is fatal for the service; the others (brokers down, transport) are logged, at most every 5 s."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._client_error, err)

    def _client_error(self, err: KafkaError) -> None:
        code, reason, fatal = _describe_error(err)
        if fatal:
            self._declare_fatal("producer", code, reason)
            return
        now = time.monotonic()
        if now - self._logged.get(("", code), -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged[("", code)] = now
            log.warning("producer_error", code=code, reason=reason)

    def _declare_fatal(self, topic: str, code: str, reason: str) -> None:
        self.parked += 1
        if self.fatal is None:
            self.fatal = FatalError(topic, f"{code}: {reason}")
            log.error("fatal", topic=topic, error=code, reason=reason)
            self.fatal_event.set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        """A retry or rescue that raised would leave its message undone forever: that is fatal, said once."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._declare_fatal("sink", type(exc).__name__, repr(exc))

    # -- reports, flush, close -------------------------------------------------------------------------
    def _producers(self) -> list[Producer]:
        return [self._producer, *list(self._narrow.values())]

    def _serve_reports(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
            for narrow in list(self._narrow.values()):
                narrow.poll(0)

    def pending(self) -> int:
        return sum(len(p) for p in self._producers())

    async def flush(self, timeout_s: float) -> int:
        """Wait until every message is delivered or the time is up; returns how many are still queued."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        left = 0
        for producer in self._producers():
            left += await loop.run_in_executor(None, producer.flush, max(0.0, deadline - time.monotonic()))
        return left

    async def close(self, timeout_s: float) -> None:
        left = await self.flush(timeout_s)
        if left:
            log.error("producer_closed_with_undelivered", count=left)
        self._stop.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._thread.join)
        for producer in self._producers():
            close = getattr(producer, "close", None)  # Producer.close() exists from confluent-kafka 2.13
            if close is not None:
                await loop.run_in_executor(None, close)  # now, not whenever the GC gets to it
        await cancel_and_wait(self._tasks)


def _describe_error(err: Any) -> tuple[str, str, bool]:
    if isinstance(err, KafkaError):
        return err.name(), err.str(), bool(err.fatal())
    return type(err).__name__, str(err), False
