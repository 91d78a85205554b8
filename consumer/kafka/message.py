"""A fetched Kafka message as the rest of the service sees it: its :class:`~consumer.records.Origin`.

Reading a message never raises. confluent-kafka decodes header keys as strict UTF-8 when ``headers()`` is
first called. A key that is not UTF-8 makes that call fail (a ``SystemError`` whose cause is the
``UnicodeDecodeError``) after the client has freed librdkafka's copy of the headers; a second call returns a
list holding a C NULL where the key should be, which must never be touched. Worse, once CPython 3.11+ has
specialised the call site ``message.headers()``, the call does not raise: it returns that list with the
decode error still pending, and the error surfaces at some later bytecode. So the headers are read exactly
once, through :func:`operator.methodcaller` (a C-API call, which always raises a pending error at the call).
On failure the message gets a :class:`DamagedOrigin` carrying the raw bytes of the key that failed (the
error's ``object``; librdkafka keys are C strings, so a key is cut at its first NUL byte); the other headers
and their values cannot be recovered from the Python client. The decoder turns a damaged origin into an
``invalid_header`` dead letter that keeps the value, the key and those bytes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from consumer.records import Origin

__all__ = ["DamagedOrigin", "Message", "origin_of"]
_READ_HEADERS = operator.methodcaller("headers")  # never `message.headers()`: see the module docstring


@dataclass(frozen=True, slots=True)
class DamagedOrigin(Origin):
    """An origin whose headers could not be read; ``headers`` is empty and ``problem`` says why."""

    problem: str = ""
    raw_header_key: bytes | None = None


def origin_of(message: Message) -> Origin:
    """Where ``message`` came from, with its key and headers as bytes. Never raises."""
    kind, stamp = message.timestamp()
    key = message.key()
    fields: dict[str, Any] = {
        "topic": message.topic() or "",
        "partition": message.partition() or 0,
        "offset": message.offset() or 0,
        "key": key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key,
        "timestamp_ms": None if kind == TIMESTAMP_NOT_AVAILABLE else stamp,
    }
    try:
        headers = _headers(_READ_HEADERS(message))
    except (UnicodeDecodeError, SystemError) as exc:
        problem, raw_key = _header_failure(exc)
        return DamagedOrigin(**fields, problem=problem, raw_header_key=raw_key)
    return Origin(**fields, headers=headers)


def _header_failure(exc: BaseException) -> tuple[str, bytes | None]:
    cause: BaseException | None = exc
    for _ in range(8):  # with several bad keys the decode error sits a few SystemErrors down the chain
        if cause is None:
            break
        if isinstance(cause, UnicodeDecodeError) and isinstance(cause.object, bytes):
            return f"a header key is not UTF-8 (byte {cause.start}: {cause.reason})", bytes(cause.object)
        cause = cause.__cause__ or cause.__context__
    return f"the headers cannot be read: {type(exc).__name__}: {exc}", None


def _headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    pairs = raw.items() if isinstance(raw, dict) else (raw or [])
    return tuple((k, v.encode() if isinstance(v, str) else (v or b"")) for k, v in pairs)
