"""The LLM worker pool: uncertain reviews in, an answer or a clean failure out, within the budget.

``max_concurrency`` workers read one bounded queue (``queue_high_water``) and share one rate limiter
(requests/minute, tokens/minute, concurrency; a 429 pauses all of them), one circuit breaker, one pool-wide
retry budget and one answer cache. Whether a failed call is retried or handed back as an
:class:`~consumer.records.LlmFailure` is decided by :func:`consumer.errors.on_llm_failure`; retries wait
with exponential backoff and full jitter. ``label()`` never raises for provider problems.

Failure reasons: ``retries_exhausted``, ``retry_budget_exhausted``, ``circuit_open``, ``invalid_answer``,
``malformed_response``, ``request_rejected``, ``request_too_large``, ``invalid_request``, ``shutdown``,
``internal_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import structlog

from consumer.aio import cancel_and_wait
from consumer.config import LlmConfig
from consumer.errors import Action, LlmError, PermanentLlmError, RateLimitedError, on_llm_failure
from consumer.llm.breaker import CircuitBreaker, Ticket
from consumer.llm.cache import LlmCache, cache_key
from consumer.llm.client import Completion, InvalidAnswerError, LlmClient, LlmTimeoutError, Usage
from consumer.llm.prompting import Prompt, PromptKind, build_prompt, estimate_request_tokens
from consumer.llm.ratelimit import Clock, MonotonicClock, Permit, RateLimiter, RequestTooLargeError
from consumer.records import LlmAnswer, LlmFailure, LlmOutcome, Scored

log = structlog.get_logger(__name__)

RETRY_FLOOR = 5
"""Retries always allowed per budget window on top of the ratio, so a quiet pool can still retry."""
RETRY_WINDOW_S = 60.0
DEFAULT_DRAIN_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Cumulative counters of one pool, for metrics. ``requests`` counts HTTP calls (attempts)."""

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


@dataclass(slots=True)
class _Counters:
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


class RetryBudget:
    """Pool-wide: retries in the last ``window_s`` may not exceed ``ratio`` x first attempts + ``floor``.

    Windowed rather than lifetime totals, so hours of health do not bank a retry storm for an outage."""

    def __init__(self, ratio: float, floor: int, clock: Clock, window_s: float = RETRY_WINDOW_S) -> None:
        self._ratio, self._floor, self._clock, self._window_s = ratio, floor, clock, window_s
        self._firsts: deque[float] = deque()
        self._retries: deque[float] = deque()

    def record_first(self) -> None:
        self._firsts.append(self._clock.now())

    def record_retry(self) -> None:
        self._retries.append(self._clock.now())

    def can_retry(self) -> bool:
        horizon = self._clock.now() - self._window_s
        for times in (self._firsts, self._retries):
            while times and times[0] <= horizon:
                times.popleft()
        return len(self._retries) < self._ratio * len(self._firsts) + self._floor


@dataclass(slots=True)
class _Job:
    review_id: str
    text: str
    prompt: Prompt
    future: asyncio.Future[LlmOutcome]
    log: Any
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def resolve(self, outcome: LlmOutcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def failure(self, reason: str, detail: str) -> LlmFailure:
        return LlmFailure(reason, detail, attempts=self.attempts, cost_usd=self.cost_usd)


class LlmPool:
    """Owns the HTTP session, limiter, breaker, cache and workers. ``async with LlmPool(config) as pool``.

    On exit it stops taking work, drains for up to ``drain_timeout_s``, then answers whatever is left with
    ``LlmFailure("shutdown")``; every worker task is awaited."""

    def __init__(
        self,
        config: LlmConfig,
        clock: Clock | None = None,
        *,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        retry_floor: int = RETRY_FLOOR,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._clock: Clock = clock or MonotonicClock()
        self._drain_timeout_s = drain_timeout_s
        self._rng = rng or random.Random()
        self._price = config.price()
        self._limiter = RateLimiter(config.rpm, config.tpm, config.max_concurrency, self._clock)
        self._breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s, self._clock)
        self._budget = RetryBudget(config.retry_budget_ratio, retry_floor, self._clock)
        self._cache = LlmCache(config.cache_size)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=config.queue_high_water)
        self._counters = _Counters()
        self._share = 1.0
        self._in_progress = 0
        self._workers: list[asyncio.Task[None]] = []
        self._stack = contextlib.AsyncExitStack()
        self._client: LlmClient | None = None
        self._state: Literal["new", "running", "closing", "closed"] = "new"

    def __repr__(self) -> str:
        return f"LlmPool(model={self._config.model!r}, state={self._state!r}, backlog={self.backlog()})"

    async def __aenter__(self) -> LlmPool:
        self._client = await self._stack.enter_async_context(LlmClient(self._config))
        self._workers = [
            asyncio.create_task(self._worker(), name=f"llm-worker-{i}") for i in range(self._config.max_concurrency)
        ]
        self._state = "running"
        log.info("llm_pool_started", model=self._config.model, workers=len(self._workers), rpm=self._config.rpm)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._state = "closing"
        if exc_type is not asyncio.CancelledError:
            await self._drain(self._drain_timeout_s)
        await cancel_and_wait(self._workers)
        self._state = "closed"
        left = self._fail_queued()
        await self._stack.aclose()
        log.info("llm_pool_stopped", failed_on_shutdown=left, **dataclasses.asdict(self.stats()))

    async def label(self, scored: Scored, prompt: Literal["s4l", "plain"] = "s4l") -> LlmOutcome:
        """The LLM's label for one review, or an :class:`LlmFailure` saying why not. Waits for queue room."""
        if self._state != "running":
            return LlmFailure("shutdown", "the LLM pool is not running")
        try:
            built = self._build(scored, prompt)
        except ValueError as exc:
            return LlmFailure("invalid_request", str(exc))
        review = scored.review
        cached = self._from_cache(review.text, built)
        if cached is not None:
            return cached
        bound = log.bind(review_id=review.id, topic=review.origin.topic, partition=review.origin.partition,
                         offset=review.origin.offset)  # fmt: skip
        job = _Job(review.id, review.text, built, asyncio.get_running_loop().create_future(), bound)
        await self._queue.put(job)
        if self._closed():
            self._fail_queued()  # we got in after the shutdown sweep: sweep again
        return await job.future

    def backlog(self) -> int:
        """Reviews queued or being worked on."""
        return self._queue.qsize() + self._in_progress

    def set_share(self, fraction: float) -> None:
        """Use ``fraction`` of the configured RPM/TPM (this instance's share of the group's partitions)."""
        self._limiter.set_share(fraction)
        self._share = fraction
        log.info("llm_share_changed", share=round(fraction, 4), rpm=self._limiter.rpm, tpm=self._limiter.tpm)

    def stats(self) -> PoolStats:
        """A snapshot of the counters."""
        c = self._counters
        return PoolStats(
            requests=c.requests, successes=c.successes, retries=c.retries, rate_limited=c.rate_limited,
            errors=c.errors, timeouts=c.timeouts, cache_hits=c.cache_hits, prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens, cost_usd=c.cost_usd, breaker_state=self._breaker.state,
            breaker_transitions=self._breaker.transition_count, backlog=self.backlog(), failures=c.failures,
            paused_for_s=max(0.0, self._limiter.paused_until - self._clock.now()),
            share=self._share,
        )  # fmt: skip

    def _closed(self) -> bool:
        return self._state == "closed"

    def _build(self, scored: Scored, kind: PromptKind) -> Prompt:
        probs = scored.prediction.probs
        return build_prompt(
            scored.review.text, probs, kind, prompt_mass=self._config.prompt_mass, hint=self._config.hint
        )

    def _from_cache(self, text: str, prompt: Prompt) -> LlmAnswer | None:
        hit = self._cache.get(cache_key(text, prompt.version, self._config.model, prompt.allowed_labels))
        if hit is not None:
            self._counters.cache_hits += 1
        return hit

    async def _drain(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        except TimeoutError:
            log.warning("llm_pool_drain_timeout", backlog=self.backlog(), timeout_s=timeout_s)

    def _fail_queued(self) -> int:
        failed = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return failed
            job.resolve(job.failure("shutdown", "the pool stopped before this review was sent"))
            self._queue.task_done()
            failed += 1

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            self._in_progress += 1
            try:
                await self._serve(job)
            finally:
                self._in_progress -= 1
                self._queue.task_done()

    async def _serve(self, job: _Job) -> None:
        if job.future.done():  # the caller stopped waiting
            return
        try:
            outcome = self._from_cache(job.text, job.prompt) or await self._run(job)
        except asyncio.CancelledError:
            job.resolve(job.failure("shutdown", "the pool stopped before an answer came"))
            raise
        except Exception as exc:
            # A bug must not leave a caller waiting forever; the traceback goes to the log.
            job.log.exception("llm_pool_internal_error")
            outcome = job.failure("internal_error", type(exc).__name__)
        job.resolve(outcome)

    async def _run(self, job: _Job) -> LlmOutcome:
        while True:
            ticket = self._breaker.try_acquire()
            if ticket is None:
                self._counters.failures += 1
                return job.failure("circuit_open", "the circuit breaker is open")
            job.attempts += 1
            try:
                completion = await self._attempt(job, ticket)
            except LlmError as exc:
                reason = await self._after_error(job, exc)
                if reason is None:
                    continue
                self._counters.failures += 1
                job.log.debug("llm_gave_up", reason=reason, attempts=job.attempts, error=str(exc))
                return job.failure(reason, str(exc))
            return self._answered(job, completion)

    async def _attempt(self, job: _Job, ticket: Ticket) -> Completion:
        estimate = estimate_request_tokens(job.prompt, self._config.max_completion_tokens)
        try:
            async with self._limiter.acquire(estimate) as permit:
                self._counters.requests += 1
                if job.attempts == 1:
                    self._budget.record_first()
                job.log.debug("llm_request", attempt=job.attempts, estimated_tokens=estimate)
                completion = await self._call(job, permit)
        except BaseException as exc:
            _settle(ticket, exc)
            raise
        ticket.success()
        return completion

    async def _call(self, job: _Job, permit: Permit) -> Completion:
        assert self._client is not None
        try:
            completion = await self._client.complete(job.prompt, review_id=job.review_id)
        except InvalidAnswerError as exc:
            if exc.usage is not None:  # a wrong answer is still billed
                permit.reconcile(exc.usage.total)
                self._bill(job, exc.usage)
            raise
        permit.reconcile(completion.usage.total)
        self._bill(job, completion.usage)
        return completion

    def _bill(self, job: _Job, usage: Usage) -> None:
        cost = (
            usage.prompt_tokens * self._price.input_per_mtok + usage.completion_tokens * self._price.output_per_mtok
        ) / 1e6
        job.prompt_tokens += usage.prompt_tokens
        job.completion_tokens += usage.completion_tokens
        job.cost_usd += cost
        c = self._counters
        c.prompt_tokens += usage.prompt_tokens
        c.completion_tokens += usage.completion_tokens
        c.cost_usd += cost

    async def _after_error(self, job: _Job, exc: LlmError) -> str | None:
        """Count the error and decide: None to retry (after waiting), or the reason to give up."""
        self._count_error(exc)
        if isinstance(exc, RateLimitedError):
            self._pause(exc.retry_after_s, job.attempts, "rate_limited")
        action = on_llm_failure(exc, job.attempts, self._config.max_attempts, self._budget.can_retry())
        if action is Action.FALLBACK:
            return _give_up_reason(exc, job.attempts, self._config.max_attempts)
        self._budget.record_retry()
        self._counters.retries += 1
        job.log.debug("llm_retry", attempt=job.attempts, error=str(exc))
        if not isinstance(exc, RateLimitedError):  # a 429's wait is the pool-wide pause, already set
            await self._clock.sleep(self._backoff_s(job.attempts))
        return None

    def _count_error(self, exc: LlmError) -> None:
        if isinstance(exc, RateLimitedError):
            self._counters.rate_limited += 1
            return
        self._counters.errors += 1
        if isinstance(exc, LlmTimeoutError):
            self._counters.timeouts += 1

    def _pause(self, seconds: float | None, attempt: int, cause: str) -> None:
        wait = seconds if seconds is not None else self._backoff_s(attempt)
        until = self._limiter.pause_for(wait)
        log.info(
            "llm_pool_paused",
            cause=cause,
            pause_s=round(wait, 3),
            resume_in_s=round(until - self._clock.now(), 3),
        )

    def _backoff_s(self, attempt: int) -> float:
        """Exponential backoff with full jitter: uniform(0, min(max, base * 2^(attempt-1)))."""
        cap = min(self._config.backoff_max_s, self._config.backoff_base_s * 2 ** max(0, attempt - 1))
        return self._rng.uniform(0.0, cap)

    def _answered(self, job: _Job, completion: Completion) -> LlmAnswer:
        self._counters.successes += 1
        pause = completion.limits.exhausted_pause_s()
        if pause is not None:  # the provider says the budget is spent: wait for its reset, do not earn a 429
            self._pause(pause, job.attempts, "remaining_exhausted")
        answer = LlmAnswer(
            label=completion.label, model=self._config.model, prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens, cost_usd=job.cost_usd, latency_ms=completion.latency_ms,
            prompt_version=job.prompt.version, attempts=job.attempts,
        )  # fmt: skip
        self._cache.put(cache_key(job.text, job.prompt.version, self._config.model, job.prompt.allowed_labels), answer)
        job.log.debug(
            "llm_answer", label=answer.label, attempts=answer.attempts, latency_ms=round(answer.latency_ms, 1)
        )
        return answer


def _settle(ticket: Ticket, exc: BaseException) -> None:
    """Tell the breaker what an attempt that raised says about the provider's health."""
    if isinstance(exc, InvalidAnswerError):
        ticket.success()  # the provider is up; the model just answered badly
    elif isinstance(exc, LlmError) and not isinstance(exc, RateLimitedError | RequestTooLargeError):
        ticket.failure()
    else:
        ticket.release()  # throttled, too large, cancelled: nothing learned


def _give_up_reason(exc: LlmError, attempt: int, max_attempts: int) -> str:
    if isinstance(exc, PermanentLlmError):
        return str(getattr(exc, "reason", "permanent_error"))
    if attempt >= max_attempts:
        return "retries_exhausted"
    return "retry_budget_exhausted"
