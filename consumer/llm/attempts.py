"""One job's way to the provider: a breaker ticket, a rate-limit permit, the call, its bill, and on an error
the retry decision (:func:`consumer.errors.on_llm_failure`) with its wait.

A 429 (and an answer whose rate-limit headers say the budget is spent) pauses every worker through the
shared limiter, for at most ``max_retry_after_s``; other retryable errors wait with exponential backoff and
full jitter. What an attempt that raised tells the breaker is :func:`consumer.errors.breaker_effect`'s call:
401/403 trip it at once and log one ``llm_auth_failed``.
"""

from __future__ import annotations

import math
import random

import structlog

from consumer.config import LlmConfig
from consumer.errors import Action, AuthFailedError, LlmError, RateLimitedError, breaker_effect, on_llm_failure
from consumer.llm.breaker import CircuitBreaker, Ticket
from consumer.llm.budget import RetryBudget
from consumer.llm.client import Completion, InvalidAnswerError, LlmClient, LlmTimeoutError, Usage
from consumer.llm.jobs import Counters, Job, give_up_reason
from consumer.llm.prompting import estimate_request_tokens
from consumer.llm.ratelimit import Clock, Permit, RateLimiter
from consumer.records import LlmAnswer, LlmOutcome

log = structlog.get_logger(__name__)


class Attempts:
    """Sends jobs for the pool, sharing its limiter, breaker, retry budget and counters."""

    def __init__(
        self,
        config: LlmConfig,
        clock: Clock,
        rng: random.Random,
        *,
        limiter: RateLimiter,
        breaker: CircuitBreaker,
        budget: RetryBudget,
        counters: Counters,
    ) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng
        self._limiter = limiter
        self._breaker = breaker
        self._budget = budget
        self._counters = counters
        self._price = config.price()
        self._client: LlmClient | None = None
        self.auth_failed = False

    def open(self, client: LlmClient) -> None:
        """The pool's HTTP client, once it is open."""
        self._client = client

    async def run(self, job: Job) -> LlmOutcome:
        """Attempts until an answer, or the reason to give up (the breaker is open, the policy says fall back)."""
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

    async def _attempt(self, job: Job, ticket: Ticket) -> Completion:
        estimate = estimate_request_tokens(job.prompt, self._config.max_completion_tokens)
        try:
            async with self._limiter.acquire(estimate) as permit:
                self._counters.requests += 1
                if job.attempts == 1:
                    self._budget.record_first()
                job.log.debug("llm_request", attempt=job.attempts, estimated_tokens=estimate)
                completion = await self._call(job, permit)
        except BaseException as exc:
            self._settle(ticket, exc)
            raise
        ticket.success()
        if self.auth_failed:
            self.auth_failed = False
            log.info("llm_auth_recovered")
        return completion

    def _settle(self, ticket: Ticket, exc: BaseException) -> None:
        """Tell the breaker what an attempt that raised says about the provider's health (the policy's call)."""
        effect = breaker_effect(exc)
        if effect == "healthy":
            ticket.success()
        elif effect == "failing":
            ticket.failure()
        elif effect == "misconfigured":
            ticket.trip()
            self._on_auth_failed(exc)
        else:
            ticket.release()  # throttled, rejected for this request only, cancelled: nothing learned

    def _on_auth_failed(self, exc: BaseException) -> None:
        if not self.auth_failed:  # one clear event, not one per review
            self.auth_failed = True
            status = exc.status if isinstance(exc, AuthFailedError) else None
            log.error("llm_auth_failed", status=status, detail=str(exc), model=self._config.model)

    async def _call(self, job: Job, permit: Permit) -> Completion:
        if self._client is None:
            raise RuntimeError("Attempts.run before the pool opened its HTTP client")
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

    def _bill(self, job: Job, usage: Usage) -> None:
        cost = job.bill(usage.prompt_tokens, usage.completion_tokens, self._price)
        c = self._counters
        c.prompt_tokens += usage.prompt_tokens
        c.completion_tokens += usage.completion_tokens
        c.cost_usd += cost

    async def _after_error(self, job: Job, exc: LlmError) -> str | None:
        """Count the error and decide: None to retry (after waiting), or the reason to give up."""
        self._count_error(exc)
        if isinstance(exc, RateLimitedError):
            self._pause(exc.retry_after_s, job.attempts, "rate_limited")
        action = on_llm_failure(exc, job.attempts, self._config.max_attempts, self._budget.can_retry())
        if action is Action.FALLBACK:
            return give_up_reason(exc, job.attempts, self._config.max_attempts)
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
        cap = self._config.max_retry_after_s
        if not wait <= cap:  # also NaN: a provider's (or a proxy's bad date's) day-long wait must not freeze us
            if self._clock.now() >= self._limiter.paused_until:  # once per pause, not once per 429
                seen = wait if math.isfinite(wait) else str(wait)
                log.warning("llm_retry_after_capped", cause=cause, seen_s=seen, cap_s=cap)
            wait = cap
        until = self._limiter.pause_for(wait)
        log.info(
            "llm_pool_paused", cause=cause, pause_s=round(wait, 3), resume_in_s=round(until - self._clock.now(), 3)
        )

    def _backoff_s(self, attempt: int) -> float:
        """Exponential backoff with full jitter: uniform(0, min(max, base * 2^(attempt-1)))."""
        cap = min(self._config.backoff_max_s, self._config.backoff_base_s * 2 ** max(0, attempt - 1))
        return self._rng.uniform(0.0, cap)

    def _answered(self, job: Job, completion: Completion) -> LlmAnswer:
        self._counters.successes += 1
        pause = completion.limits.exhausted_pause_s()
        if pause is not None:  # the provider says the budget is spent: wait for its reset, do not earn a 429
            self._pause(pause, job.attempts, "remaining_exhausted")
        answer = LlmAnswer(
            label=completion.label, model=self._config.model, prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens, cost_usd=job.cost_usd, latency_ms=completion.latency_ms,
            prompt_version=job.prompt.version, attempts=job.attempts,
        )  # fmt: skip
        job.log.debug(
            "llm_answer", label=answer.label, attempts=answer.attempts, latency_ms=round(answer.latency_ms, 1)
        )
        return answer
