"""What the service writes: the labeled, DLQ and distill messages, built from pipeline records.

Each builder returns a plain dict that matches its schema in ``schemas/``; tests validate every one.
"""

from __future__ import annotations

import base64
import time
from typing import Any

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
    """A dead letter: the original bytes, key and headers, where it came from, and why it failed."""
    return {
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


def distill(scored: Scored, answer: LlmAnswer) -> dict[str, Any]:
    """An LLM answer kept as a training label for the small model (L4S)."""
    prediction = scored.prediction
    return {
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
