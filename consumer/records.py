"""The small frozen records that move one way through the pipeline.

message in -> :class:`Review` -> :class:`Scored` -> routed -> :class:`LlmAnswer` or not -> :class:`Labeled`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Source = Literal["small", "large", "fallback", "cache"]
TopicPartition = tuple[str, int]
"""A partition of a topic, as a plain (topic, partition) pair: hashable, cheap, no client types."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a message came from: enough to commit its offset and to trace it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Review:
    """A decoded, validated input review."""

    id: str
    text: str
    origin: Origin
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Prediction:
    """The small model's calibrated view of one review."""

    label: str
    confidence: float
    probs: dict[str, float]
    model_version: str


@dataclass(frozen=True, slots=True)
class Scored:
    review: Review
    prediction: Prediction


@dataclass(frozen=True, slots=True)
class LlmAnswer:
    """A usable answer from the large model, with what it cost."""

    label: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    prompt_version: str
    cached: bool = False
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class LlmFailure:
    """The pool gave up on a review; ``reason`` is a machine-readable code. ``cost_usd`` and the token counts
    are what the provider billed on the way (an invalid answer is still paid for): they count in the cost
    meter whatever becomes of the review."""

    reason: str
    detail: str = ""
    attempts: int = 0
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


LlmOutcome = LlmAnswer | LlmFailure
