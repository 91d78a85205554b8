"""A fetched Kafka message as the rest of the service sees it: its :class:`~consumer.records.Origin`."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from consumer.records import Origin

__all__ = ["Message", "origin_of"]


def origin_of(message: Message) -> Origin:
    """Where ``message`` came from, with its key and headers as bytes."""
    kind, stamp = message.timestamp()
    key = message.key()
    return Origin(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=key.encode() if isinstance(key, str) else key,
        headers=_headers(message.headers()),
        timestamp_ms=None if kind == TIMESTAMP_NOT_AVAILABLE else stamp,
    )


def _headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    pairs = raw.items() if isinstance(raw, dict) else (raw or [])
    return tuple((k, v.encode() if isinstance(v, str) else (v or b"")) for k, v in pairs)
