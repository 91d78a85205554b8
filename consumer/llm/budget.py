"""The pool-wide retry budget: retries in the last window may not exceed ``ratio`` x first attempts + ``floor``.

Windowed rather than lifetime totals, so hours of health do not bank a retry storm for an outage. Attempts
are counted in one-second buckets and the window is trimmed on every record, not only when someone asks
whether a retry is allowed: a healthy pool never asks, and a list of every first attempt would grow by
the hour. The memory is at most one bucket per second of the window, whatever the request rate.
"""

from __future__ import annotations

import math
from collections import deque

from consumer.llm.ratelimit import Clock

RETRY_FLOOR = 5
"""Retries always allowed per budget window on top of the ratio, so a quiet pool can still retry."""
RETRY_WINDOW_S = 60.0


class _Buckets:
    """Counts per whole second over a sliding window (``[second, count]`` pairs, oldest first)."""

    __slots__ = ("_buckets", "_total", "_window_s")

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._buckets: deque[list[int]] = deque()
        self._total = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def add(self, now: float) -> None:
        self.trim(now)
        second = math.floor(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([second, 1])
        self._total += 1

    def total(self, now: float) -> int:
        self.trim(now)
        return self._total

    def trim(self, now: float) -> None:
        # A bucket leaves once its whole second is older than the window.
        horizon = now - self._window_s
        while self._buckets and self._buckets[0][0] + 1 <= horizon:
            self._total -= self._buckets.popleft()[1]


class RetryBudget:
    """See the module docstring. ``clock`` is injectable for tests."""

    def __init__(self, ratio: float, floor: int, clock: Clock, window_s: float = RETRY_WINDOW_S) -> None:
        self._ratio, self._floor, self._clock = ratio, floor, clock
        self._firsts, self._retries = _Buckets(window_s), _Buckets(window_s)

    def record_first(self) -> None:
        self._firsts.add(self._clock.now())

    def record_retry(self) -> None:
        self._retries.add(self._clock.now())

    def can_retry(self) -> bool:
        now = self._clock.now()
        return self._retries.total(now) < self._ratio * self._firsts.total(now) + self._floor

    def held(self) -> int:
        """Buckets held in memory (for tests: bounded by the window, not by the traffic)."""
        return len(self._firsts) + len(self._retries)

    def firsts_in_window(self) -> int:
        return self._firsts.total(self._clock.now())
