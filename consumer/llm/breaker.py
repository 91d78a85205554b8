"""A circuit breaker for the LLM provider: stop calling a provider that keeps failing, probe it now and then.

closed --(``failures`` consecutive failures)--> open --(``reset_s`` later, next call)--> half_open
half_open --(the probe succeeds)--> closed;  half_open --(the probe fails)--> open.

Any state --(:meth:`Ticket.trip`: 401/403, the service is misconfigured)--> open, at once.

In half_open one probe at a time goes through; everything else is refused. Each call holds a
:class:`Ticket` stamped with the breaker's generation (bumped on every transition), so a late answer to a
request sent before the breaker changed state cannot close or reopen it by accident. Every transition is
logged as ``breaker_transition`` and counted.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import structlog

from consumer.llm.ratelimit import Clock, MonotonicClock

BreakerState = Literal["closed", "open", "half_open"]

log = structlog.get_logger(__name__)


class Ticket:
    """Permission for one call. Report exactly one of :meth:`success`, :meth:`failure`, :meth:`release`."""

    __slots__ = ("_breaker", "_done", "generation", "probe")

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: bool) -> None:
        self._breaker = breaker
        self.generation = generation
        self.probe = probe
        self._done = False

    def success(self) -> None:
        """The provider answered: it is healthy."""
        if self._settle():
            self._breaker._on_success(self)

    def failure(self) -> None:
        """The provider failed (5xx, timeout, connection error, garbage)."""
        if self._settle():
            self._breaker._on_failure(self)

    def trip(self) -> None:
        """The provider refused our credentials: open now, whatever the count (every call would fail)."""
        if self._settle():
            self._breaker._on_trip()

    def release(self) -> None:
        """The call ended without saying anything about the provider's health (cancelled, throttled)."""
        if self._settle():
            self._breaker._on_release(self)

    def _settle(self) -> bool:
        first, self._done = not self._done, True
        return first


class CircuitBreaker:
    """See the module docstring. ``clock`` is injectable for tests."""

    def __init__(self, failures: int, reset_s: float, clock: Clock | None = None, *, name: str = "llm") -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError("failures must be >= 1 and reset_s > 0")
        self._threshold = failures
        self._reset_s = reset_s
        self._clock: Clock = clock or MonotonicClock()
        self._name = name
        self._state: BreakerState = "closed"
        self._generation = 0
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_out = False
        self.transitions: Counter[tuple[str, str]] = Counter()

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self._name!r}, state={self._state!r})"

    @property
    def state(self) -> BreakerState:
        """ "closed", "open" or "half_open", for metrics."""
        return self._state

    @property
    def transition_count(self) -> int:
        return sum(self.transitions.values())

    def try_acquire(self) -> Ticket | None:
        """A ticket for one call, or None when the breaker refuses it (open, or a probe is already out)."""
        if self._state == "open":
            if self._clock.now() - self._opened_at < self._reset_s:
                return None
            self._move("half_open")
        if self._state == "half_open":
            if self._probe_out:
                return None
            self._probe_out = True
            return Ticket(self, self._generation, probe=True)
        return Ticket(self, self._generation, probe=False)

    def _on_success(self, ticket: Ticket) -> None:
        if ticket.generation != self._generation:
            return
        self._consecutive = 0
        if self._state == "half_open":
            self._move("closed")

    def _on_failure(self, ticket: Ticket) -> None:
        if ticket.generation != self._generation:
            return
        self._consecutive += 1
        if self._state == "half_open" or self._consecutive >= self._threshold:
            self._opened_at = self._clock.now()
            self._move("open")

    def _on_trip(self) -> None:
        # No generation check: a bad key is bad for every request, however late its answer comes.
        self._opened_at = self._clock.now()
        if self._state != "open":
            self._move("open")

    def _on_release(self, ticket: Ticket) -> None:
        if ticket.generation == self._generation and ticket.probe:
            self._probe_out = False

    def _move(self, to_state: BreakerState) -> None:
        from_state, self._state = self._state, to_state
        self._generation += 1
        self._probe_out = False
        self.transitions[(from_state, to_state)] += 1
        level = log.warning if to_state == "open" else log.info
        level(
            "breaker_transition",
            breaker=self._name,
            from_state=from_state,
            to_state=to_state,
            consecutive_failures=self._consecutive,
        )
        if to_state == "closed":
            self._consecutive = 0
