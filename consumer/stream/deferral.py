"""Sending a review to the batch lane: the ``deferred.v1`` record, reading it back, and the pipeline's hook.

The pipeline hands an uncertain review to :class:`Deferrer` instead of the online pool when ``llm.lane`` is
``batch``, or ``overflow`` with the pool's backlog at its high-water mark. The review is written to
``topics.deferred`` (its origin's headers kept on the record); once that is delivered its input offset is
done, so a batch that takes hours never holds the input's commits back. The batch stage
(:mod:`consumer.stream.deferred`) reads it back with :func:`read_deferred`.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from consumer import contracts
from consumer.config import Settings
from consumer.errors import BadInputError
from consumer.kafka.message import Message, origin_of
from consumer.kafka.sink import KafkaSink, Outgoing
from consumer.records import Origin, Prediction, Review, Scored
from consumer.records import TopicPartition as TP

_KEY = re.compile(r"^shunt:(?P<topic>[^:]+):(?P<partition>\d+):(?P<first>\d+)-(?P<last>\d+)$")


@dataclass(frozen=True, slots=True)
class Deferred:
    """A review read back from the deferred topic: the scored review (its origin is the input's) and where
    the deferred record itself sits (whose offset the batch stage commits)."""

    scored: Scored
    position: Origin

    @property
    def custom_id(self) -> str:
        """The batch request's id: the deferred record's place, unique and stable across restarts."""
        return f"{self.position.topic}:{self.position.partition}:{self.position.offset}"


def batch_key(tp: TP, first: int, last: int) -> str:
    """The metadata key of a batch covering deferred offsets ``first..last`` of one partition."""
    return f"shunt:{tp[0]}:{tp[1]}:{first}-{last}"


def parse_key(key: str) -> tuple[TP, int, int] | None:
    """``(partition, first, last)`` from :func:`batch_key`'s text; None for anything else."""
    match = _KEY.match(key)
    if match is None:
        return None
    return (match["topic"], int(match["partition"])), int(match["first"]), int(match["last"])


def deferred_record(scored: Scored, threshold: float, instance_id: str, reason: str) -> dict[str, Any]:
    review, prediction, origin = scored.review, scored.prediction, scored.review.origin
    return {
        "schema_version": "deferred.v1",
        "id": review.id,
        "text": review.text,
        "metadata": review.metadata,
        "small": {
            "label": prediction.label,
            "confidence": prediction.confidence,
            "probs": prediction.probs,
            "model_version": prediction.model_version,
        },
        "origin": {
            "topic": origin.topic,
            "partition": origin.partition,
            "offset": origin.offset,
            "timestamp_ms": origin.timestamp_ms,
            "key_b64": None if origin.key is None else base64.b64encode(origin.key).decode("ascii"),
        },
        "threshold": threshold,
        "reason": reason,
        "deferred_at_ms": time.time_ns() // 1_000_000,
        "instance_id": instance_id,
    }


def read_deferred(message: Message) -> Deferred:
    """The review a deferred record holds; :class:`BadInputError` when it is not a deferred.v1 record."""
    position = origin_of(message)
    try:
        doc = orjson.loads(message.value() or b"")
        small, where = doc["small"], doc["origin"]
        key = where.get("key_b64")
        origin = Origin(
            topic=str(where["topic"]), partition=int(where["partition"]), offset=int(where["offset"]),
            key=None if key is None else base64.b64decode(key), headers=position.headers,
            timestamp_ms=where.get("timestamp_ms"),
        )  # fmt: skip
        review = Review(str(doc["id"]), str(doc["text"]), origin, dict(doc.get("metadata") or {}))
        probs = {str(label): float(p) for label, p in small["probs"].items()}
        prediction = Prediction(str(small["label"]), float(small["confidence"]), probs, str(small["model_version"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadInputError("invalid_deferred", f"not a deferred.v1 record: {type(exc).__name__}") from None
    return Deferred(Scored(review, prediction), position)


class Deferring(Protocol):
    """The pipeline's hook into the batch lane."""

    def takes(self, backlog: int) -> bool:
        """Whether the next uncertain review goes to the batch lane, given the online pool's backlog."""
        ...

    def pausing_backlog(self, backlog: int) -> int:
        """The online backlog the pipeline's pause should see (0 when a full backlog defers instead)."""
        ...

    async def defer(self, scored: Scored, on_delivered: Callable[[], None]) -> None:
        """Write the review to the deferred topic; ``on_delivered`` runs once the broker has it."""
        ...


class NoDeferral:
    """``llm.lane = online``: nothing is deferred, the backlog pauses the input as before."""

    def takes(self, backlog: int) -> bool:
        return False

    def pausing_backlog(self, backlog: int) -> int:
        return backlog

    async def defer(self, scored: Scored, on_delivered: Callable[[], None]) -> None:
        raise RuntimeError("the online lane defers nothing")


NO_DEFERRAL = NoDeferral()


class Deferrer:
    """The pipeline's hook for ``batch`` and ``overflow``: :meth:`takes` says whether an uncertain review goes
    to the batch lane now, :meth:`defer` writes it to the deferred topic."""

    def __init__(self, settings: Settings, sink: KafkaSink) -> None:
        self._lane = settings.llm.lane
        self._high_water = settings.llm.queue_high_water
        self._topic = settings.topics.deferred
        self._threshold = settings.router.threshold
        self._instance_id = settings.metrics.instance_id
        self._sink = sink
        self.deferred = 0

    def takes(self, backlog: int) -> bool:
        return self._lane == "batch" or (self._lane == "overflow" and backlog >= self._high_water)

    def pausing_backlog(self, backlog: int) -> int:
        """In ``overflow`` a full online backlog sends reviews here instead of pausing the input."""
        return 0 if self._lane == "overflow" else backlog

    async def defer(self, scored: Scored, on_delivered: Callable[[], None]) -> None:
        """Write the review to the deferred topic; ``on_delivered`` runs once the broker has it."""
        origin = scored.review.origin
        record = deferred_record(scored, self._threshold, self._instance_id, self._lane)
        out = Outgoing(self._topic, scored.review.id, contracts.dumps(record), origin.headers, origin)
        self.deferred += 1
        await self._sink.publish(out, on_delivered)
