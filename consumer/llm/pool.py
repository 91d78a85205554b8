"""The LLM worker pool: uncertain reviews in, an answer or a clean failure out, within the budget.

``max_concurrency`` workers read one bounded queue (``queue_high_water`` reviews, ``max_queue_bytes`` of
them) and share one rate limiter (requests/minute, tokens/minute, concurrency; a 429 pauses all of them,
for at most ``max_retry_after_s``), one circuit breaker, one pool-wide retry budget and one answer cache.
Identical reviews in flight at once share one request (single flight). Whether a failed call is retried or
handed back as an :class:`~consumer.records.LlmFailure` is decided by :func:`consumer.errors.on_llm_failure`,
and what it tells the breaker by :func:`consumer.errors.breaker_effect`: a request rejected for itself
(400/404/413/422) falls back for that review only; 401/403 open the breaker at once, log one
``llm_auth_failed`` and mark the pool not ready (:attr:`PoolStats.auth_failed`). Retries wait with
exponential backoff and full jitter (one job's attempts: :mod:`consumer.llm.attempts`). ``label()`` never
raises for provider problems.

Failure reasons: ``retries_exhausted``, ``retry_budget_exhausted``, ``circuit_open``, ``invalid_answer``,
``malformed_response``, ``request_rejected``, ``too_large_for_tpm``,
``invalid_request``, ``shutdown``, ``internal_error``, ``audit_skipped`` (a shadow request not sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from types import TracebackType
from typing import Literal

import structlog

from consumer.aio import cancel_and_wait
from consumer.config import LlmConfig
from consumer.llm.attempts import Attempts
from consumer.llm.breaker import CircuitBreaker
from consumer.llm.budget import RETRY_FLOOR, RetryBudget
from consumer.llm.cache import CacheKey, LlmCache, cache_key
from consumer.llm.client import LlmClient
from consumer.llm.jobs import ByteGate, Counters, Job, Lanes, PoolStats, follow, job_bytes
from consumer.llm.prompting import Prompt, PromptKind, build_prompt, estimate_request_tokens
from consumer.llm.ratelimit import Clock, MonotonicClock, RateLimiter
from consumer.records import LlmAnswer, LlmFailure, LlmOutcome, Scored

__all__ = ["RETRY_FLOOR", "LlmPool", "PoolStats", "RetryBudget"]

log = structlog.get_logger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 10.0


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
        self._limiter = RateLimiter(config.rpm, config.tpm, config.max_concurrency, self._clock)
        self._breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s, self._clock)
        self._budget = RetryBudget(config.retry_budget_ratio, retry_floor, self._clock)
        self._cache = LlmCache(config.cache_size, config.cache_max_bytes)
        slots = max(1, config.max_concurrency // 4)  # audits never take more of the workers than this
        self._queue = Lanes(config.queue_high_water, max(1, config.queue_low_water // 10), slots)
        self._counters = Counters()
        self._flights: dict[CacheKey, asyncio.Future[LlmOutcome]] = {}
        self._gate = ByteGate(config.max_queue_bytes)  # jobs waiting for a queue slot, queued or in progress
        self._attempts = Attempts(config, self._clock, rng or random.Random(), limiter=self._limiter,
                                  breaker=self._breaker, budget=self._budget, counters=self._counters)  # fmt: skip
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
        self._attempts.open(self._client)
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

    async def label(
        self, scored: Scored, prompt: Literal["s4l", "plain"] = "s4l", *, audit: bool = False
    ) -> LlmOutcome:
        """The LLM's label for one review, or an :class:`LlmFailure` saying why not. Waits for queue room.
        ``audit``: a shadow request, lowest priority (:class:`~consumer.llm.jobs.Lanes`), that never waits."""
        if self._state != "running":
            return LlmFailure("shutdown", "the LLM pool is not running")
        try:
            key, size, early = self._plan(scored, prompt)
        except ValueError as exc:
            return LlmFailure("invalid_request", str(exc))
        if early is not None:
            return early
        if audit:
            return await self._audit(scored, prompt, key)
        while (flight := self._flights.get(key)) is not None:
            shared = await follow(flight)
            if shared is not None:
                self._counters.shared += 1
                return shared
        future: asyncio.Future[LlmOutcome] = asyncio.get_running_loop().create_future()
        self._flights[key] = future  # identical reviews from now on wait for this one (single flight)
        try:
            return await self._submit(scored, prompt, key, size, future)
        finally:
            if self._flights.get(key) is future:
                del self._flights[key]

    def _plan(self, scored: Scored, kind: PromptKind) -> tuple[CacheKey, int, LlmOutcome | None]:
        """The cache key, the bytes the queued job will hold, and an outcome that needs no request (a cache
        hit, a prompt too large for the TPM). The prompt is built here only to be measured: it is built again
        once there is room, so a review waiting for room holds only its text."""
        built = self._build(scored, kind)
        key = cache_key(scored.review.text, built.version, self._config.model, built.allowed_labels)
        return key, job_bytes(scored.review.text, built), self._from_cache(key) or self._too_large(built)

    def _too_large(self, prompt: Prompt) -> LlmFailure | None:
        estimate = estimate_request_tokens(prompt, self._config.max_completion_tokens)
        if self._limiter.fits(estimate):
            return None
        self._counters.failures += 1  # no wait makes it fit: say so now rather than hold it
        return LlmFailure("too_large_for_tpm", f"~{estimate} tokens is over the limit of {self._config.tpm}/min")

    async def _submit(
        self, scored: Scored, kind: PromptKind, key: CacheKey, size: int, future: asyncio.Future[LlmOutcome]
    ) -> LlmOutcome:
        await self._gate.enter(size)
        review = scored.review
        bound = log.bind(review_id=review.id, topic=review.origin.topic, partition=review.origin.partition,
                         offset=review.origin.offset)  # fmt: skip
        job = Job(review.id, review.text, self._build(scored, kind), key, future, bound, size=size)
        try:
            await self._queue.put(job)
        except BaseException:
            self._release(job)
            raise
        if self._closed():
            self._fail_queued()  # we got in after the shutdown sweep: sweep again
        return await future

    async def _audit(self, scored: Scored, kind: PromptKind, key: CacheKey) -> LlmOutcome:
        """Past the low-water mark, or with the audit lane full, it fails at once (``audit_skipped``)."""
        future: asyncio.Future[LlmOutcome] = asyncio.get_running_loop().create_future()
        job = Job(scored.review.id, scored.review.text, self._build(scored, kind), key, future,
                  log.bind(review_id=scored.review.id, audit=True), audit=True)  # fmt: skip
        if self.backlog() > self._config.queue_low_water or not self._queue.offer_audit(job):
            return LlmFailure("audit_skipped", "the LLM backlog is above its low-water mark")
        return await future

    def _release(self, job: Job) -> None:
        self._gate.leave(job.size)
        job.size = 0

    def backlog(self) -> int:
        """Reviews queued or being worked on (audits apart: :meth:`audit_backlog`)."""
        return self._queue.qsize() + self._in_progress - self._queue.audits_in_progress

    def audit_backlog(self) -> int:
        """Audits (shadow requests) queued or being worked on."""
        return self._queue.audits()

    def backlog_bytes(self) -> int:
        """Review bytes the backlog holds (queued, waiting for a queue slot, or being worked on)."""
        return self._gate.held

    @property
    def auth_failed(self) -> bool:
        """True from a 401/403 until an answer comes through again: the service is misconfigured."""
        return self._attempts.auth_failed

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
            share=self._share, auth_failed=self._attempts.auth_failed, backlog_bytes=self._gate.held, shared=c.shared,
        )  # fmt: skip

    def _closed(self) -> bool:
        return self._state == "closed"

    def _build(self, scored: Scored, kind: PromptKind) -> Prompt:
        probs = scored.prediction.probs
        return build_prompt(
            scored.review.text, probs, kind, prompt_mass=self._config.prompt_mass, hint=self._config.hint
        )

    def _from_cache(self, key: CacheKey) -> LlmAnswer | None:
        hit = self._cache.get(key)
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
        jobs = self._queue.sweep()
        for job in jobs:
            job.resolve(job.failure("shutdown", "the pool stopped before this review was sent"))
            self._release(job)
        return len(jobs)

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            self._in_progress += 1
            try:
                await self._serve(job)
            finally:
                self._in_progress -= 1
                self._release(job)
                self._queue.done(job)

    async def _serve(self, job: Job) -> None:
        if job.future.done():  # the caller stopped waiting
            return
        try:
            outcome = self._from_cache(job.key) or await self._attempts.run(job)
            if isinstance(outcome, LlmAnswer):
                self._cache.put(job.key, outcome)
        except asyncio.CancelledError:
            job.resolve(job.failure("shutdown", "the pool stopped before an answer came"))
            raise
        except Exception as exc:
            # A bug must not leave a caller waiting forever; the traceback goes to the log.
            job.log.exception("llm_pool_internal_error")
            outcome = job.failure("internal_error", type(exc).__name__)
        job.resolve(outcome)
