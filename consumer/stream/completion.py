"""What one input message still waits for: each delivery of an output it produced counts down; the last one
finishes it (its offset can then be stored, once every earlier offset is done too)."""

from __future__ import annotations

import time
from collections.abc import Callable

from consumer.records import LlmAnswer, Origin, Source


class Completion:
    """Counts the deliveries one input message still waits for; the last one finishes it."""

    __slots__ = (
        "answer",
        "cost_usd",
        "dlq_reason",
        "est_tokens",
        "on_finish",
        "origin",
        "remaining",
        "source",
        "started",
    )

    def __init__(
        self, origin: Origin, remaining: int, on_finish: Callable[[Completion], None], source: Source | None = None
    ) -> None:
        self.origin, self.remaining, self.on_finish, self.source = origin, remaining, on_finish, source
        self.started = time.monotonic()
        self.answer: LlmAnswer | None = None
        self.cost_usd = 0.0
        self.est_tokens = 0
        self.dlq_reason: str | None = None

    def __call__(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.on_finish(self)
