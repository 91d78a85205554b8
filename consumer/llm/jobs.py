"""What the LLM pool keeps per review and in total: the job in its queue, the counters, the stats snapshot."""

from __future__ import annotations

import asyncio
from collections import deque
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
    audit: bool = False  # a shadow request: served only when no real review waits

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


class Lanes:
    """The pool's two queues. Real reviews (bounded, awaiting room) always go first; an audit (a shadow
    request) is served only when no real review is queued and fewer than ``audit_slots`` audits are in
    progress, so audits never hold a real review back by more than the requests already in flight. At most
    ``audit_max`` audits wait; :meth:`offer_audit` refuses one beyond that rather than wait."""

    def __init__(self, maxsize: int, audit_max: int, audit_slots: int) -> None:
        self.real: asyncio.Queue[Job] = asyncio.Queue(maxsize)
        self._audits: deque[Job] = deque()
        self._audit_max, self._audit_slots = audit_max, audit_slots
        self.audits_in_progress = 0
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for a job, first come first woken

    async def put(self, job: Job) -> None:
        await self.real.put(job)
        self._wake_one()

    def offer_audit(self, job: Job) -> bool:
        if len(self._audits) >= self._audit_max:
            return False
        self._audits.append(job)
        self._wake_one()
        return True

    async def get(self) -> Job:
        """The next job; an idle worker waits until one is put for it (one waiter woken per job, not all)."""
        while True:
            try:
                return self.get_nowait(self._audit_slots)
            except asyncio.QueueEmpty:
                waiter = asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():
                        self._wake_one()  # woken and cancelled at once: the job it was woken for needs another
                    raise

    def _wake_one(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def get_nowait(self, audit_slots: int | None = None) -> Job:
        """The next job: a real one, else an audit while a slot is free (any audit with no limit given)."""
        if not self.real.empty():
            return self.real.get_nowait()
        if self._audits and (audit_slots is None or self.audits_in_progress < audit_slots):
            self.audits_in_progress += 1
            return self._audits.popleft()
        raise asyncio.QueueEmpty

    def done(self, job: Job) -> None:
        if job.audit:
            self.audits_in_progress -= 1
            self._wake_one()  # an audit slot is free: a waiting audit may go
        else:
            self.real.task_done()

    def qsize(self) -> int:
        """Real reviews queued (audits are not part of the backlog that pauses the input)."""
        return self.real.qsize()

    def audits(self) -> int:
        return len(self._audits) + self.audits_in_progress

    async def join(self) -> None:
        await self.real.join()

    def sweep(self) -> list[Job]:
        """Take every queued job out (at shutdown), real and audit."""
        jobs: list[Job] = []
        while True:
            try:
                jobs.append(self.get_nowait())
            except asyncio.QueueEmpty:
                return jobs
            self.done(jobs[-1])


def give_up_reason(exc: LlmError, attempt: int, max_attempts: int) -> str:
    """The reason a review falls back once the policy said not to retry."""
    if isinstance(exc, PermanentLlmError):
        return str(getattr(exc, "reason", "permanent_error"))
    if attempt >= max_attempts:
        return "retries_exhausted"
    return "retry_budget_exhausted"
