"""What the LLM pool keeps per review and in total: the job in its queue, the counters, the stats snapshot."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from consumer.config import PriceConfig
from consumer.errors import LlmError, PermanentLlmError
from consumer.llm.cache import CacheKey
from consumer.llm.prompting import Prompt
from consumer.records import LlmAnswer, LlmFailure, LlmOutcome


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Cumulative counters of one pool, for metrics. ``requests`` counts HTTP calls (attempts).

    ``auth_failed`` is true from a 401/403 until an answer comes through again: the service is
    misconfigured and should not be ready. ``backlog_bytes`` is the review bytes the backlog holds."""

    requests: int
    successes: int
    retries: int
    rate_limited: int
    errors: int
    timeouts: int
    cache_hits: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    breaker_state: str
    breaker_transitions: int
    backlog: int
    failures: int = 0
    paused_for_s: float = 0.0
    share: float = 1.0
    auth_failed: bool = False
    backlog_bytes: int = 0
    shared: int = 0


@dataclass(slots=True)
class Counters:
    requests: int = 0
    successes: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: int = 0
    timeouts: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    failures: int = 0
    shared: int = 0


@dataclass(slots=True)
class Job:
    """One review on its way to the provider. ``size`` is the bytes it holds (text and prompt)."""

    review_id: str
    text: str
    prompt: Prompt
    key: CacheKey
    future: asyncio.Future[LlmOutcome]
    log: Any
    size: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def resolve(self, outcome: LlmOutcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def bill(self, prompt_tokens: int, completion_tokens: int, price: PriceConfig) -> float:
        """Add one answer's billed usage to this review's; return its cost in USD."""
        cost = (prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / 1e6
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost_usd += cost
        return cost

    def failure(self, reason: str, detail: str) -> LlmFailure:
        """A failure carrying what was billed on the way, so it is counted whatever becomes of the review."""
        return LlmFailure(
            reason, detail, attempts=self.attempts, cost_usd=self.cost_usd, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )  # fmt: skip


def job_bytes(text: str, prompt: Prompt) -> int:
    """The memory a queued review holds, roughly: its text and the prompt that embeds it again."""
    return len(text) + sum(len(message["content"]) for message in prompt.messages)


def shared_outcome(outcome: LlmOutcome) -> LlmOutcome:
    """The outcome of a request another identical review made: the same answer, paid for once (by it)."""
    if isinstance(outcome, LlmAnswer):
        return replace(
            outcome, prompt_tokens=0, completion_tokens=0, cost_usd=0.0, latency_ms=0.0, cached=True, attempts=0
        )
    return replace(outcome, attempts=0, cost_usd=0.0, prompt_tokens=0, completion_tokens=0)


async def follow(flight: asyncio.Future[LlmOutcome]) -> LlmOutcome | None:
    """Wait for an identical review's request (single flight) and share its outcome; None when its caller
    gave up on it before an answer came (then ask for ourselves)."""
    try:
        outcome = await asyncio.shield(flight)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if flight.cancelled() and (task is None or not task.cancelling()):
            return None
        raise
    return shared_outcome(outcome)


class ByteGate:
    """Admits sizes while their sum stays within ``limit`` (one is always let in alone, so none waits forever)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.held = 0
        self._room = asyncio.Event()

    async def enter(self, size: int) -> None:
        while self.held > 0 and self.held + size > self._limit:
            self._room.clear()
            await self._room.wait()
        self.held += size

    def leave(self, size: int) -> None:
        self.held -= size
        self._room.set()


def give_up_reason(exc: LlmError, attempt: int, max_attempts: int) -> str:
    """The reason a review falls back once the policy said not to retry."""
    if isinstance(exc, PermanentLlmError):
        return str(getattr(exc, "reason", "permanent_error"))
    if attempt >= max_attempts:
        return "retries_exhausted"
    return "retry_budget_exhausted"
