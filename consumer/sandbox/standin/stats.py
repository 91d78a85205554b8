"""What ``GET /stats`` counts: the counters, the busiest 60 s window, early requests and recent bodies.

The counters: requests, answered, rate_limited_sent, errors_injected, timeouts_injected, malformed_sent,
out_of_set_sent, unmatched, auth_failures, bad_requests, prompt_tokens, completion_tokens,
max_requests_in_any_60s_window, early_requests (requests that arrived while a Retry-After it had sent was
still in force); and the batch lane's (:data:`~consumer.sandbox.standin.batches.BATCH_COUNTERS`): files
uploaded, batches created and how they ended, the requests in them, duplicates (a request already seen in an
earlier batch), items failed or expired, and the tokens of batch answers (apart from the chat counters).
``recent_requests`` holds the last request bodies it received.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from consumer.sandbox.standin.batches import BATCH_COUNTERS
from consumer.sandbox.standin.limits import WINDOW_S

COUNTERS = (
    "requests", "answered", "rate_limited_sent", "errors_injected", "timeouts_injected", "malformed_sent",
    "out_of_set_sent", "unmatched", "auth_failures", "bad_requests", "prompt_tokens", "completion_tokens",
    "max_requests_in_any_60s_window", "early_requests", *BATCH_COUNTERS,
)  # fmt: skip


class Stats:
    """The counters and the request bodies kept for ``/stats``; ``reset`` zeroes both."""

    def __init__(self, keep_bodies: int) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.bodies: deque[Any] = deque(maxlen=keep_bodies)
        self._arrivals: deque[float] = deque()
        self._retry_until = -math.inf

    def reset(self) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.bodies.clear()

    def arrive(self, now: float) -> None:
        """Count one request, whether it came early, and the busiest 60 s window so far."""
        self.counters["requests"] += 1
        if now < self._retry_until:
            self.counters["early_requests"] += 1
        self._arrivals.append(now)
        while self._arrivals[0] <= now - WINDOW_S:
            self._arrivals.popleft()
        self.counters["max_requests_in_any_60s_window"] = max(
            self.counters["max_requests_in_any_60s_window"], len(self._arrivals)
        )

    def retry_after_sent(self, until: float) -> None:
        """A 429 told clients to wait until ``until`` (monotonic): requests before then are early."""
        self._retry_until = max(self._retry_until, until)
