"""Requests/minute, tokens/minute and concurrency limits for the LLM pool: never over budget, nearly all of it.

Why not a library. aiolimiter is a leaky bucket: from a full bucket it admits ``max_rate`` at once and then
drains at ``max_rate`` per period, so a rolling 60 s window can hold nearly twice the limit; it also has no
token-cost reconciliation and no pool-wide pause. ``limits``' moving window is exact, but it reads the wall
clock, cannot be driven by a fake clock and only answers yes/no (callers would poll). So this small module
combines two mechanisms for each of requests and tokens:

* **GCRA pacing** (virtual scheduling): requests go out one every ``span / rpm`` seconds and tokens at
  ``tpm / span`` per second, where ``span = window_s + margin_s``. Providers that enforce a per-minute
  limit at a finer grain see a smooth stream, and under saturation the pool still sends
  ``rpm * window_s / span`` requests a minute (99.2 % with the default margin). The schedule tolerates
  being early by half an interval (at most 0.25 s) for requests and by 1 s for tokens: timer overshoot
  and the odd long review then do not push the whole schedule back (which cost ~1 % in the benchmark),
  and there is still no burst after an idle spell.
* **An exact rolling-window log** (time and amount of everything admitted in the last ``span``): the hard
  guarantee. Nothing is admitted that would put more than the limit into any window of ``span`` seconds,
  even right after :meth:`RateLimiter.set_share` lowered the limits or a token estimate was reconciled.

Callers are admitted first come, first served, without a lock: each waits for its turn in a line, and only
the caller at the head sleeps on the clock until its request fits (so a cancelled caller just leaves the
line). A request larger than this instance's token share (after :meth:`RateLimiter.set_share`) waits for a
window of its own: it goes once nothing else is in the window, and the window then holds only it. One that
could never fit, larger than the whole configured TPM, is not waited for: :meth:`RateLimiter.fits` says
so and the pool falls back at once (``too_large_for_tpm``).

``margin_s`` absorbs the jitter between the moment we admit a request and the moment the provider counts
it, so the provider's own 60 s windows stay within the limit too. A 429 or an exhausted
``x-ratelimit-remaining-*`` header calls :meth:`RateLimiter.pause_for`, which holds back every caller of
the limiter, not just the one that saw it. The clock is injectable (:class:`FakeClock` for tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import ClassVar, Protocol

from consumer.errors import BreakerEffect, PermanentLlmError

WINDOW_S = 60.0
DEFAULT_MARGIN_S = 0.5
REQUEST_TOLERANCE_S = 0.25  # at most; never more than half a pacing interval
TOKEN_TOLERANCE_S = 1.0


class Clock(Protocol):
    """Monotonic time in seconds and a way to wait on it."""

    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock for tests: time moves only when :meth:`advance` is called or, with ``autojump``, when
    something sleeps (then time jumps to the end of that sleep, as trio's autojump clock does)."""

    def __init__(self, start: float = 0.0, *, autojump: bool = False) -> None:
        self._now = start
        self._autojump = autojump
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for time to move (tests wait on this instead of sleeping)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        if self._autojump:
            self.advance(max(0.0, seconds))
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._order), future))
        self._wake_due()
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleep that is due."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds
        self._wake_due()

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


class RequestTooLargeError(PermanentLlmError):
    """One request's token estimate is above the whole tokens/minute limit: it could never be sent."""

    reason = "request_too_large"
    breaker: ClassVar[BreakerEffect] = "neutral"


class _Entry:
    __slots__ = ("amount", "at", "live")

    def __init__(self, at: float, amount: int) -> None:
        self.at = at
        self.amount = amount
        self.live = True


class RollingWindow:
    """The exact amount admitted in the last ``span`` seconds, and when ``amount`` more would fit."""

    def __init__(self, span: float) -> None:
        self._span = span
        self._entries: deque[_Entry] = deque()
        self._total = 0

    def total(self, now: float) -> int:
        self._expire(now)
        return self._total

    def ready_at(self, now: float, amount: int, limit: int) -> float:
        """The earliest time at which adding ``amount`` keeps the window's total within ``limit``.

        An amount above the limit (a request above this instance's share) gets a window of its own: it is
        let through alone, once everything in the window has left, so it never waits forever."""
        self._expire(now)
        if self._total + amount <= limit:
            return now
        if amount > limit:
            return self._entries[-1].at + self._span if self._total > 0 else now
        excess, freed = self._total + amount - limit, 0
        for entry in self._entries:
            freed += entry.amount
            if freed >= excess:
                return entry.at + self._span
        return self._entries[-1].at + self._span  # not reached: amount <= limit

    def add(self, now: float, amount: int) -> _Entry:
        entry = _Entry(now, amount)
        self._entries.append(entry)
        self._total += amount
        return entry

    def adjust(self, entry: _Entry, amount: int) -> None:
        """Replace an estimate with the real amount; an entry already out of the window no longer counts."""
        if entry.live:
            self._total += amount - entry.amount
            entry.amount = amount

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0].at + self._span <= now:
            entry = self._entries.popleft()
            entry.live = False
            self._total -= entry.amount


class Pacer:
    """GCRA virtual scheduling: ``take(amount)`` books ``amount * unit_s`` seconds of the schedule."""

    def __init__(self) -> None:
        self._tat = -math.inf  # theoretical arrival time of the next unit

    def ready_at(self, now: float, tolerance_s: float = 0.0) -> float:
        """When the next one may go: on schedule, or up to ``tolerance_s`` early."""
        return max(now, self._tat - tolerance_s)

    def take(self, now: float, amount: int, unit_s: float) -> None:
        self._tat = max(self._tat, now) + amount * unit_s

    def correct(self, delta_amount: int, unit_s: float) -> None:
        """Give back (or book more of) the time of an estimate that turned out wrong."""
        self._tat += delta_amount * unit_s


class Permit:
    """One admitted request. Call :meth:`reconcile` with the provider's reported usage when it answers."""

    __slots__ = ("_entry", "_limiter", "estimate")

    def __init__(self, limiter: RateLimiter, entry: _Entry, estimate: int) -> None:
        self._limiter = limiter
        self._entry = entry
        self.estimate = estimate

    def reconcile(self, actual_tokens: int) -> None:
        """Replace the token estimate with what the provider counted (usage.total_tokens)."""
        self._limiter._reconcile(self._entry, actual_tokens)


class RateLimiter:
    """Requests/minute, tokens/minute and concurrency for one pool; see the module docstring.

    Use ``async with limiter.acquire(estimated_tokens) as permit:`` around one HTTP request, after
    :meth:`fits` said it can ever be sent. Callers are admitted first come, first served (a line of turns;
    no lock is held while anyone sleeps).
    """

    def __init__(
        self,
        rpm: int,
        tpm: int,
        max_concurrency: int,
        clock: Clock | None = None,
        *,
        window_s: float = WINDOW_S,
        margin_s: float = DEFAULT_MARGIN_S,
    ) -> None:
        if rpm <= 0 or tpm <= 0 or max_concurrency <= 0:
            raise ValueError("rpm, tpm and max_concurrency must be positive")
        self._rpm, self._tpm = rpm, tpm
        self._clock: Clock = clock or MonotonicClock()
        self._span = window_s + margin_s
        self._share = 1.0
        self._requests, self._tokens = RollingWindow(self._span), RollingWindow(self._span)
        self._request_pacer, self._token_pacer = Pacer(), Pacer()
        self._paused_until = -math.inf
        self._line: deque[asyncio.Future[None]] = deque()
        self._slots = asyncio.Semaphore(max_concurrency)
        self.in_flight = 0
        self.admitted = 0

    def __repr__(self) -> str:
        return f"RateLimiter(rpm={self.rpm}, tpm={self.tpm}, share={self._share:.3f})"

    @property
    def rpm(self) -> int:
        """Requests per window this instance may send now (its share of the configured limit)."""
        return max(1, math.floor(self._rpm * self._share))

    @property
    def tpm(self) -> int:
        """Tokens per window this instance may use now (its share of the configured limit)."""
        return max(1, math.floor(self._tpm * self._share))

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def set_share(self, fraction: float) -> None:
        """Use ``fraction`` (0..1] of the configured limits: this instance's share of the consumer group's
        partitions. Rounded down, so the instances of a group never add up to more than the limit."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {fraction!r}")
        self._share = fraction

    def pause_for(self, seconds: float) -> float:
        """Hold back every request of the pool for ``seconds`` from now (a 429's Retry-After). Pauses only
        ever extend. Returns the time the pool resumes."""
        self._paused_until = max(self._paused_until, self._clock.now() + max(0.0, seconds))
        return self._paused_until

    def fits(self, tokens: int) -> bool:
        """Whether a request of ``tokens`` could ever be sent: at most the whole configured TPM (a larger
        share later would let it through; nothing lets through more than the provider's limit)."""
        return tokens <= self._tpm

    @property
    def waiting(self) -> int:
        """Callers in line for admission (the head may be sleeping on the clock)."""
        return len(self._line)

    def tokens_in_window(self) -> int:
        return self._tokens.total(self._clock.now())

    def requests_in_window(self) -> int:
        return self._requests.total(self._clock.now())

    @contextlib.asynccontextmanager
    async def acquire(self, tokens: int) -> AsyncIterator[Permit]:
        """Wait for a concurrency slot and for the moment ``tokens`` more fit every limit; hold the slot
        while the body runs. A request that could never fit (see :meth:`fits`) is refused at once with
        :class:`RequestTooLargeError`, before it takes a slot or waits."""
        if not self.fits(tokens):
            raise RequestTooLargeError(f"a request of ~{tokens} tokens exceeds the limit of {self._tpm}/min")
        async with self._slots:
            permit = await self._admit(max(0, tokens))
            self.in_flight += 1
            try:
                yield permit
            finally:
                self.in_flight -= 1

    async def _admit(self, tokens: int) -> Permit:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        if len(self._line) == 1:
            turn.set_result(None)
        try:
            await turn
            # Re-check after every sleep: a 429 may have extended the pause meanwhile.
            while (wait := self._ready_at(tokens) - self._clock.now()) > 0:
                await self._clock.sleep(wait)
            return self._record(tokens)
        finally:
            self._line.remove(turn)
            if self._line and not self._line[0].done():
                self._line[0].set_result(None)  # the next in line: its turn

    def _ready_at(self, tokens: int) -> float:
        now = self._clock.now()
        return max(
            self._paused_until,
            self._request_pacer.ready_at(now, min(REQUEST_TOLERANCE_S, 0.5 * self._span / self.rpm)),
            self._token_pacer.ready_at(now, TOKEN_TOLERANCE_S),
            self._requests.ready_at(now, 1, self.rpm),
            self._tokens.ready_at(now, tokens, self.tpm),
        )

    def _record(self, tokens: int) -> Permit:
        now = self._clock.now()
        self._requests.add(now, 1)
        self._request_pacer.take(now, 1, self._span / self.rpm)
        self._token_pacer.take(now, tokens, self._span / self.tpm)
        self.admitted += 1
        return Permit(self, self._tokens.add(now, tokens), tokens)

    def _reconcile(self, entry: _Entry, actual: int) -> None:
        actual = max(0, actual)
        self._token_pacer.correct(actual - entry.amount, self._span / self.tpm)
        self._tokens.adjust(entry, actual)
