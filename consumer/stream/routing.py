"""The Data Shunt decision: the small model's label is final when it is confident enough; else ask the LLM.

And, in one place, what happens when the LLM gives up: publish the small label flagged as a fallback, or
dead-letter the review.
"""

from __future__ import annotations

import enum
from typing import Literal

from consumer.records import Scored


class Route(enum.Enum):
    SMALL = "small"
    LLM = "llm"


def route(scored: Scored, threshold: float) -> Route:
    """Confidence >= threshold: the small label is final. Threshold 0 sends nothing to the LLM, 1 nearly all."""
    return Route.SMALL if scored.prediction.confidence >= threshold else Route.LLM


def on_give_up(fallback: Literal["small", "dlq"]) -> Literal["publish_fallback", "dead_letter"]:
    return "publish_fallback" if fallback == "small" else "dead_letter"
