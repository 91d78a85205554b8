"""Decode and validate one input message into a :class:`Review`, or say exactly why it cannot be one."""

from __future__ import annotations

from typing import Any

import orjson

from consumer import contracts
from consumer.errors import BadInputError
from consumer.kafka.message import DamagedOrigin
from consumer.records import Origin, Review

_KNOWN_FIELDS = frozenset({"id", "text", "schema_version"})


def decode(value: bytes | None, origin: Origin, max_text_bytes: int) -> Review:
    """Turn raw bytes into a review. Raises :class:`BadInputError` with a DLQ reason code on bad input."""
    if isinstance(origin, DamagedOrigin):
        raise BadInputError("invalid_header", origin.problem)
    if value is None:
        raise BadInputError("null_value", "the message has no value (a tombstone)")
    if len(value) > max_text_bytes * 2 + 4096:
        # Checked before parsing so a huge message costs nothing to reject.
        raise BadInputError("text_too_long", f"message is {len(value)} bytes; text limit is {max_text_bytes}")
    document = _parse(value)
    if not isinstance(document, dict):
        raise BadInputError("not_an_object", f"expected a JSON object, got {type(document).__name__}")
    _check_text(document, max_text_bytes)
    try:
        contracts.validate("review", document)
    except contracts.ContractError as exc:
        raise BadInputError("schema_violation", str(exc)) from None
    metadata = {k: v for k, v in document.items() if k not in _KNOWN_FIELDS}
    return Review(id=document["id"], text=document["text"], origin=origin, metadata=metadata)


def _parse(value: bytes) -> Any:
    """orjson reads the bytes as they are (it checks the UTF-8 itself); only a failure decodes them again, to
    tell bytes that are not UTF-8 from UTF-8 that is not JSON."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise BadInputError("invalid_utf8", f"byte {bad.start}: {bad.reason}") from None
        raise BadInputError("invalid_json", str(exc)) from None


def _check_text(document: dict[str, Any], max_text_bytes: int) -> None:
    text = document.get("text")
    if not isinstance(text, str):
        return  # the schema check names the problem
    if not text or text.isspace():
        raise BadInputError("empty_text", "text is empty or only white space")
    if len(text) * 4 <= max_text_bytes:  # a character is at most 4 bytes of UTF-8: no need to count them
        return
    size = len(text.encode("utf-8"))
    if size > max_text_bytes:
        raise BadInputError("text_too_long", f"text is {size} bytes; the limit is {max_text_bytes}")
