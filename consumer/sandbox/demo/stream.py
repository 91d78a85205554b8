"""The demo's side of Kafka going in: the run's topics, and the stream of reviews produced at a steady rate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import orjson
import structlog

from consumer.aio import wait_until
from consumer.config import KafkaConfig
from consumer.kafka.admin import TopicAdmin, TopicAdminError, TopicSpec
from consumer.kafka.sink import KafkaSink, Outgoing
from consumer.sandbox.demo.options import DemoError
from consumer.sandbox.demo.tally import Tally
from consumer.sandbox.reviewgen import SyntheticReview

log = structlog.get_logger(__name__)

TICK_S = 0.25  # progress refresh and producer pacing period
_POLL_S = 0.02  # re-checking a condition the broker will soon make true
_ADMIN_TIMEOUT_S = 30.0
_CLOSE_TIMEOUT_S = 2.0  # an interrupted run drops what the broker has not taken by then


def _admin(bootstrap: str) -> TopicAdmin:
    return TopicAdmin({"bootstrap.servers": bootstrap, "client.id": "shunt-demo-admin"})


def create_topics(bootstrap: str, partitions: Mapping[str, int]) -> None:
    """Create the run's topics (replication: the broker's default) and wait until each has its leaders."""
    specs = [TopicSpec(name, count, replication=-1) for name, count in partitions.items()]
    try:
        _admin(bootstrap).create(specs, timeout_s=_ADMIN_TIMEOUT_S)
    except TopicAdminError as exc:
        raise DemoError(str(exc)) from None
    log.info("demo_topics_created", topics=sorted(partitions))


def delete_run(bootstrap: str, names: Sequence[str], group: str) -> None:
    """Delete the run's topics and consumer group from a real cluster (the embedded broker forgets them)."""
    admin = _admin(bootstrap)
    admin.delete(names, timeout_s=_ADMIN_TIMEOUT_S)
    admin.delete_groups([group], timeout_s=_ADMIN_TIMEOUT_S)


def _review_value(review: SyntheticReview) -> bytes:
    # No true label in the message: the service must not be able to see it.
    return orjson.dumps({"schema_version": "review.v1", "id": review.id, "text": review.text,
                         "metadata": {"domain": review.domain, "source": "shunt demo"}})  # fmt: skip


class StreamProducer:
    """Produces the reviews to the input topic at a steady rate, through the service's own producer.

    Delivery reports come back on the event loop, so the tally is only ever touched from the loop.
    ``async with StreamProducer(...) as producer:`` starts it and closes it (before the broker goes)."""

    def __init__(self, kafka: KafkaConfig, topic: str, tally: Tally) -> None:
        producer = dict(kafka.producer) | {"client.id": "shunt-demo-stream"}
        self._sink = KafkaSink(kafka.model_copy(update={"producer": producer}))
        self._topic, self._tally = topic, tally
        self._handed = 0

    async def __aenter__(self) -> StreamProducer:
        await self._sink.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._sink.close(_CLOSE_TIMEOUT_S)

    async def send(self, reviews: Sequence[SyntheticReview]) -> None:
        """Hand ``reviews`` to the client and wait until the broker has them all."""
        for review in reviews:
            await self._produce(review)
        await self.flush()

    async def flush(self, timeout_s: float = _ADMIN_TIMEOUT_S) -> None:
        """Wait until the broker has acknowledged everything handed over."""
        if not await wait_until(lambda: self._tally.produced >= self._handed, timeout_s, tick_s=_POLL_S):
            failed = self._sink.failed_deliveries
            raise DemoError(f"could not produce the reviews: delivery timed out ({failed} failed deliveries)")

    async def _produce(self, review: SyntheticReview) -> None:
        self._handed += 1
        await self._sink.publish(Outgoing(self._topic, review.id, _review_value(review)), self._delivered)

    def _delivered(self) -> None:
        self._tally.produced += 1  # acknowledged by the broker

    async def paced(self, reviews: Sequence[SyntheticReview], rate: float, stop: asyncio.Event) -> None:
        """``rate`` reviews per second (0: as fast as possible) until all are sent or ``stop`` is set."""
        started, sent = time.monotonic(), 0
        while sent < len(reviews) and not stop.is_set():
            due = len(reviews) if rate <= 0 else min(len(reviews), int((time.monotonic() - started) * rate) + 1)
            due = min(due, sent + 1000)  # let the progress view breathe when producing flat out
            for review in reviews[sent:due]:
                await self._produce(review)
            sent = due
            await asyncio.sleep(TICK_S if rate > 0 else 0)  # pacing the stream, not waiting for anything
        await self.flush()
