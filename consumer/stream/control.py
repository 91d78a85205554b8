"""The closed loop's parts, pure and clock-injected: audit sampling, agreement, the drift alarm, the adaptive
threshold and the spend cap. The pipeline feeds them and acts on what they say; none of them does I/O.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from consumer.stream.risk import Interval, clopper_pearson, clopper_pearson_lower, risk_threshold

Clock = Callable[[], float]


class AuditSampler:
    """A seeded share of small-path reviews, chosen by a hash of (seed, review id): the same review is
    chosen on every instance and after every restart, so a replay audits the same reviews."""

    def __init__(self, rate: float, seed: int) -> None:
        self._cut = int(rate * 2**64)
        self._seed = seed.to_bytes(8, "big", signed=True)

    def chosen(self, review_id: str) -> bool:
        if self._cut <= 0:
            return False
        digest = hashlib.blake2b(review_id.encode("utf-8", "surrogatepass"), digest_size=8, key=self._seed)
        return int.from_bytes(digest.digest(), "big") < self._cut


@dataclass(frozen=True, slots=True)
class AuditSample:
    """One audited review: the small model's confidence and whether the LLM agreed with its label."""

    confidence: float
    agreed: bool


class Agreement:
    """Agreement counts per metrics window and in total, with exact (Clopper–Pearson) intervals."""

    def __init__(self, confidence: float = 0.95) -> None:
        self._confidence = confidence
        self.window_agreed = self.window_total = 0
        self.agreed = self.total = 0

    def add(self, agreed: bool) -> None:
        self.window_agreed += agreed
        self.window_total += 1
        self.agreed += agreed
        self.total += 1

    def window(self) -> Interval:
        return clopper_pearson(self.window_agreed, self.window_total, self._confidence)

    def cumulative(self) -> Interval:
        return clopper_pearson(self.agreed, self.total, self._confidence)

    def roll(self) -> None:
        """Start a new metrics window."""
        self.window_agreed = self.window_total = 0


class DriftAlarm:
    """A quality alarm over the last ``window`` audit results: it fires when the interval's upper bound falls
    below ``min_agreement`` (agreement is surely too low) and clears, with hysteresis, once the lower bound
    is back at ``min_agreement + hysteresis`` or above (agreement is surely fine again)."""

    def __init__(self, min_agreement: float, window: int, hysteresis: float = 0.02, confidence: float = 0.95) -> None:
        self.min_agreement, self.hysteresis, self._confidence = min_agreement, hysteresis, confidence
        self._recent: deque[bool] = deque(maxlen=window)
        self.firing = False

    def update(self, agreed: bool) -> bool | None:
        """Add one audit result; True when the alarm fires now, False when it clears now, else None."""
        self._recent.append(agreed)
        interval = self.interval()
        if not self.firing and interval.high < self.min_agreement:
            self.firing = True
            return True
        if self.firing and interval.low >= self.min_agreement + self.hysteresis:
            self.firing = False
            return False
        return None

    def interval(self) -> Interval:
        return clopper_pearson(sum(self._recent), len(self._recent), self._confidence)

    def expected_delay(self, before: float, after: float) -> int | None:
        """Audit results after a drift from agreement ``before`` to ``after`` until the alarm is expected to
        fire (the window full of ``before`` first, counts at their expectation); None if it never would."""
        size = self._recent.maxlen or 0
        for m in range(1, size + 1):
            agreed = round(before * (size - m) + after * m)
            if clopper_pearson(agreed, size, self._confidence).high < self.min_agreement:
                return m
        return None


@dataclass(frozen=True, slots=True)
class ThresholdMove:
    """A change of the threshold in force, and why."""

    old: float
    new: float
    target: float | None
    reason: str


class AdaptiveThreshold:
    """The risk rule run online on audit samples (the LLM's answer as the reference).

    Every ``every`` new samples the target tau is recomputed over the last ``window`` samples; the tau in
    force moves towards it by at most ``step``, and only when the gap exceeds ``hysteresis``. With no
    certified tau the target is the ceiling (send nearly everything uncertain to the LLM) when the samples at
    or above the tau in force refute it (the lower bound on their error is above ``max_error``); otherwise the
    tau in force (certified offline, by ``shunt eval --max-error``) stays: too few samples to certify a tau
    online is a lack of evidence, not evidence against it."""

    def __init__(
        self,
        start: float,
        max_error: float,
        risk_confidence: float,
        *,
        window: int = 2000,
        every: int = 50,
        step: float = 0.02,
        hysteresis: float = 0.01,
        bounds: tuple[float, float] = (0.5, 0.999),
    ) -> None:
        self.tau = start
        self._max_error, self._risk = max_error, risk_confidence
        self._samples: deque[AuditSample] = deque(maxlen=window)
        self._every, self._step, self._hysteresis, self._bounds = every, step, hysteresis, bounds
        self._since = 0

    def add(self, sample: AuditSample) -> ThresholdMove | None:
        self._samples.append(sample)
        self._since += 1
        if self._since < self._every:
            return None
        self._since = 0
        return self._recompute()

    def refuted(self) -> bool:
        """The samples at or above the tau in force show, surely, an error above ``max_error``."""
        above = [s.agreed for s in self._samples if s.confidence >= self.tau]
        return clopper_pearson_lower(len(above) - sum(above), len(above), 1.0 - self._risk) > self._max_error

    def _recompute(self) -> ThresholdMove | None:
        choice = risk_threshold(
            [s.confidence for s in self._samples], [s.agreed for s in self._samples], self._max_error, self._risk
        )
        if choice.threshold is not None:
            target = min(max(choice.threshold, self._bounds[0]), self._bounds[1])
        elif self.refuted():
            target = self._bounds[1]
        else:
            return None
        gap = target - self.tau
        if abs(gap) <= self._hysteresis:
            return None
        new = round(self.tau + max(-self._step, min(self._step, gap)), 6)
        move = ThresholdMove(self.tau, new, choice.threshold, "risk_up" if gap > 0 else "risk_down")
        self.tau = new
        return move


class SpendCap:
    """Keeps LLM spend within ``usd_per_hour``: over any ``window_s`` the money admitted is at most the
    window's allowance plus one request's price.

    A request is admitted while the spend of the last ``window_s`` seconds is under the allowance; its
    estimated price counts at once and is corrected to the billed price when the answer comes. ``margin_s``
    keeps each admission in the window that long more (the allowance stays ``window_s``'s): spend is seen
    when its answer is delivered, up to an LLM latency after the admission, so any ``window_s`` of
    deliveries still holds at most the allowance plus one request."""

    def __init__(
        self, usd_per_hour: float, window_s: float, clock: Clock = time.monotonic, *, margin_s: float = 0.0
    ) -> None:
        self.allowance = usd_per_hour * window_s / 3600.0
        self._window_s, self._clock = window_s + margin_s, clock
        self._log: deque[tuple[float, float]] = deque()
        self._spent = 0.0

    def _trim(self, now: float) -> None:
        while self._log and self._log[0][0] <= now - self._window_s:
            self._spent -= self._log.popleft()[1]

    def spent(self) -> float:
        """Money admitted in the last ``window_s`` seconds."""
        self._trim(self._clock())
        return max(self._spent, 0.0)

    def pressure(self) -> float:
        """Spent / allowance over the window: above 1 the cap binds."""
        return self.spent() / self.allowance if self.allowance > 0 else float("inf")

    def admit(self, estimate_usd: float, *, force: bool = False) -> bool:
        """Admit one request (its estimate counts now) unless the window's allowance is used up; ``force``
        counts it whatever the window holds (the risk rule wins) and says whether it was within the cap."""
        now = self._clock()
        self._trim(now)
        within = self._spent < self.allowance
        if not (within or force):
            return False
        self._log.append((now, estimate_usd))
        self._spent += estimate_usd
        return within

    def correct(self, estimate_usd: float, billed_usd: float) -> None:
        """The answer's bill is known: count the difference now (it stays in the window for its length)."""
        delta = billed_usd - estimate_usd
        if delta:
            self._log.append((self._clock(), delta))
            self._spent += delta
