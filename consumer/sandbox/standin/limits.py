"""The stand-in's own rate limits: requests/minute and tokens/minute in rolling 60 s windows, and storms.

Its TPM window charges prompt + ``max_completion_tokens`` when a request is admitted, as OpenAI does.
``x-ratelimit-reset-*`` is the time until the next request (or enough tokens) fit again.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from consumer.sandbox.standin.config import Faults

WINDOW_S = 60.0


def go_duration(seconds: float) -> str:
    """Seconds as OpenAI writes ``x-ratelimit-reset-*``: ``"250ms"``, ``"1.5s"``, ``"6m0s"``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class Limits:
    """The stand-in's own RPM/TPM: what it admitted in the last 60 s."""

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_total = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_total -= self.tokens.popleft()[1]

    def wait_s(self, now: float, estimate: int, faults: Faults) -> float:
        """0 when one more request of ``estimate`` tokens fits both limits, else how long until it does."""
        self.expire(now)
        waits = [0.0]
        if faults.rpm is not None and len(self.requests) >= faults.rpm:
            waits.append(self.requests[len(self.requests) - faults.rpm] + WINDOW_S - now)
        if faults.tpm is not None and self.token_total + estimate > faults.tpm:
            waits.append(self._token_wait(now, self.token_total + estimate - faults.tpm))
        return max(waits)

    def _token_wait(self, now: float, excess: int) -> float:
        freed = 0
        for at, amount in self.tokens:
            freed += amount
            if freed >= excess:
                return at + WINDOW_S - now
        return WINDOW_S  # larger than the whole limit: say a minute, it will never fit

    def admit(self, now: float, estimate: int) -> None:
        self.requests.append(now)
        self.tokens.append((now, estimate))
        self.token_total += estimate

    def headers(self, now: float, faults: Faults) -> dict[str, str]:
        self.expire(now)
        out: dict[str, str] = {}
        if faults.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(faults.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, faults.rpm - len(self.requests)))
            out["x-ratelimit-reset-requests"] = go_duration(self._request_reset(now, faults.rpm))
        if faults.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(faults.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, faults.tpm - self.token_total))
            out["x-ratelimit-reset-tokens"] = go_duration(self.tokens[0][0] + WINDOW_S - now if self.tokens else 0.0)
        return out

    def _request_reset(self, now: float, rpm: int) -> float:
        if len(self.requests) < rpm:
            return 0.0
        return self.requests[len(self.requests) - rpm] + WINDOW_S - now


@dataclass
class Storm:
    """A 429 storm set with ``POST /control``: the next ``requests`` requests, or until ``until``."""

    requests: int = 0
    until: float = -math.inf
    retry_after_s: float = 2.0

    def active(self, now: float) -> bool:
        return self.requests > 0 or now < self.until

    def take(self) -> None:
        self.requests = max(0, self.requests - 1)
