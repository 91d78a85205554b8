"""What the service writes: the labeled, DLQ and distill messages, built from pipeline records.

Each builder returns a plain dict that matches its schema in ``schemas/``; tests validate every one.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import orjson

from consumer import contracts
from consumer.kafka.message import DamagedOrigin
from consumer.kafka.sink import Outgoing
from consumer.records import LlmAnswer, LlmFailure, Origin, Scored

RESULT_HEADERS = ("shunt-source",)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def position(origin: Origin) -> dict[str, Any]:
    return {"topic": origin.topic, "partition": origin.partition, "offset": origin.offset}


def _llm_block(answer: LlmAnswer) -> dict[str, Any]:
    return {
        "model": answer.model,
        "label": answer.label,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "cost_usd": answer.cost_usd,
        "latency_ms": round(answer.latency_ms, 3),
        "cached": answer.cached,
        "attempts": answer.attempts,
        "prompt_version": answer.prompt_version,
    }


def labeled(
    scored: Scored, outcome: LlmAnswer | LlmFailure | None, threshold: float, instance_id: str
) -> dict[str, Any]:
    """The output for one review. ``outcome`` is None on the small path."""
    prediction, review = scored.prediction, scored.review
    now = _now_ms()
    message: dict[str, Any] = {
        "schema_version": "labeled.v1",
        "id": review.id,
        "label": prediction.label,
        "confidence": prediction.confidence,
        "source": "small",
        "fallback_reason": None,
        "small": {"label": prediction.label, "confidence": prediction.confidence, "probs": prediction.probs},
        "llm": None,
        "cost_usd": 0.0,
        "threshold": threshold,
        "model_version": prediction.model_version,
        "prompt_version": None,
        "input": position(review.origin),
        "metadata": review.metadata,
        "instance_id": instance_id,
        "processed_at_ms": now,
        "latency_ms": None if review.origin.timestamp_ms is None else max(0, now - review.origin.timestamp_ms),
    }
    if isinstance(outcome, LlmAnswer):
        message |= {
            "label": outcome.label,
            "confidence": None,
            "source": "large",
            "llm": _llm_block(outcome),
            "cost_usd": outcome.cost_usd,
            "prompt_version": outcome.prompt_version,
        }
    elif isinstance(outcome, LlmFailure):
        message |= {"source": "fallback", "fallback_reason": outcome.reason, "cost_usd": outcome.cost_usd}
    return message


def dlq(
    reason: str,
    detail: str,
    origin: Origin,
    value: bytes | None,
    instance_id: str,
    *,
    review_id: str | None = None,
) -> dict[str, Any]:
    """A dead letter: the original bytes, key and headers, where it came from, and why it failed.

    For an origin whose headers could not be read, ``headers_incomplete`` is set and the raw bytes of the header
    key that failed are kept in ``invalid_header_key_b64``. :func:`fit` cuts a letter down to a size."""
    letter = {
        "schema_version": "dlq.v1",
        "reason": reason,
        "detail": detail[:2000],
        "review_id": review_id,
        "input": position(origin),
        "original_b64": _b64(value),
        "key_b64": _b64(origin.key),
        "headers": [{"key": k, "value_b64": _b64(v)} for k, v in origin.headers],
        "instance_id": instance_id,
        "failed_at_ms": _now_ms(),
    }
    if isinstance(origin, DamagedOrigin):
        letter["headers_incomplete"] = True
        if origin.raw_header_key is not None:
            letter["invalid_header_key_b64"] = _b64(origin.raw_header_key)
    return letter


def distill(scored: Scored, answer: LlmAnswer, *, audit: bool = False) -> dict[str, Any]:
    """An LLM answer kept as a training label for the small model (L4S); ``audit``: a shadow request's."""
    prediction = scored.prediction
    record = {
        "schema_version": "distill.v1",
        "id": scored.review.id,
        "text": scored.review.text,
        "llm_label": answer.label,
        "small_label": prediction.label,
        "small_confidence": prediction.confidence,
        "small_probs": prediction.probs,
        "model_version": prediction.model_version,
        "llm_model": answer.model,
        "prompt_version": answer.prompt_version,
        "created_at_ms": _now_ms(),
    }
    return record | {"audit": True} if audit else record


# -- dead letters that always fit ----------------------------------------------------------------------------
MAX_DLQ_KEY_BYTES = 1024  # a longer key is replaced, as the dead letter's record key, by its sha256 (hex)
_SLACK_BYTES = 16


def fit(letter: dict[str, Any], room: int) -> dict[str, Any]:
    """``letter`` cut down so that its JSON takes at most ``room`` bytes.

    The copies of the key (up to an eighth of the room), of a header key that is not UTF-8 (an eighth), of the
    headers (whole headers, in order, up to a quarter) and of the original value (the rest) keep a prefix each.
    The letter is marked ``truncated`` and says the full size and sha256 of the original value and of the key,
    and how many headers the message had."""
    raws = {name: _unb64(letter.get(f"{name}_b64")) for name in ("original", "key", "invalid_header_key")}
    headers: list[dict[str, Any]] = list(letter.get("headers") or [])
    shell = dict(letter, detail=str(letter.get("detail", ""))[:500], headers=[], truncated=True)
    shell.setdefault("headers_count", len(headers))
    for name, raw in raws.items():
        if raw is not None or name != "invalid_header_key":
            shell[f"{name}_b64"] = None if raw is None else ""
        if raw is not None and name != "invalid_header_key" and f"{name}_size" not in letter:
            shell |= {f"{name}_size": len(raw), f"{name}_sha256": hashlib.sha256(raw).hexdigest()}
    avail = room - len(contracts.dumps(shell)) - _SLACK_BYTES
    used = 0
    for name in ("key", "invalid_header_key"):
        if (raw := raws[name]) is not None:
            shell[f"{name}_b64"] = _prefix_b64(raw, avail // 8)
            used += len(shell[f"{name}_b64"])
    used += _take_headers(headers, shell["headers"], avail // 4)
    if (original := raws["original"]) is not None:
        shell["original_b64"] = _prefix_b64(original, avail - used)
    return shell


def _take_headers(headers: list[dict[str, Any]], kept: list[dict[str, Any]], budget: int) -> int:
    """Whole headers, in order, while their JSON fits ``budget``; returns the bytes they take."""
    used = 0
    for header in headers:
        size = len(orjson.dumps(header)) + 1
        if used + size > budget:
            break
        kept.append(header)
        used += size
    return used


def _prefix_b64(raw: bytes, budget: int) -> str:
    """The longest prefix of ``raw`` whose base64 takes at most ``budget`` characters, in base64."""
    return base64.b64encode(raw[: max(0, budget) // 4 * 3]).decode("ascii")


def _unb64(text: Any) -> bytes | None:
    return base64.b64decode(text) if isinstance(text, str) else None


class DeadLetters:
    """The sink's rescuer: a message refused for good (too large, invalid) becomes a dead letter that fits.

    A dead letter that is too large is cut down (:func:`fit`). Any other output is dead-lettered with reason
    ``output_refused``: its copy is the refused output itself, and its position is the input it answers (the
    output's ``input`` field, or the ``origin`` it was published with); without a position there is no dead
    letter to write (None: the sink treats that as fatal)."""

    def __init__(self, topic: str, instance_id: str) -> None:
        self.topic = topic
        self._instance_id = instance_id

    def __call__(self, out: Outgoing, reason: str, room: int) -> Outgoing | None:
        document = _json_object(out.value)
        letter = document if document.get("schema_version") == "dlq.v1" else self._refused(out, reason, document)
        if letter is None:
            return None
        key = out.key.encode() if isinstance(out.key, str) else out.key
        if key is not None and len(key) > MAX_DLQ_KEY_BYTES:
            key = hashlib.sha256(key).hexdigest().encode("ascii")
        value = contracts.dumps(letter)
        room -= len(key or b"")
        return Outgoing(self.topic, key, value if len(value) <= room else contracts.dumps(fit(letter, room)))

    def _refused(self, out: Outgoing, reason: str, document: dict[str, Any]) -> dict[str, Any] | None:
        where = document.get("input")
        if not (isinstance(where, dict) and {"topic", "partition", "offset"} <= where.keys()):
            if out.origin is None:
                return None
            where = position(out.origin)
        review_id = document.get("id")
        key = out.key.encode() if isinstance(out.key, str) else out.key
        return {
            "schema_version": "dlq.v1",
            "reason": "output_refused",
            "detail": f"{out.topic} refused it: {reason}"[:2000],
            "review_id": review_id if isinstance(review_id, str) else None,
            "input": {k: where[k] for k in ("topic", "partition", "offset")},
            "original_b64": _b64(out.value),
            "key_b64": _b64(key),
            "headers": [{"key": k, "value_b64": _b64(v)} for k, v in out.headers],
            "instance_id": self._instance_id,
            "failed_at_ms": _now_ms(),
        }


def _json_object(value: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return document if isinstance(document, dict) else {}
