"""The closed loop in the service: audits, agreement, the drift alarm, the adaptive threshold and the spend cap.

The pipeline asks :meth:`ClosedLoop.threshold` for the tau in force, tells :meth:`ClosedLoop.on_small` about
each small-path decision (which may start an audit) and sends its LLM requests through
:meth:`ClosedLoop.label` (the spend cap, the risk rule's samples). The parts are the pure ones of
:mod:`consumer.stream.control`; this module does the I/O and the bookkeeping around them.

- An audit is a shadow request for a seeded share of small-path reviews, in the pool's lowest-priority lane
  with the plain prompt (no hint, so the reference does not lean on the small model's guess). The review's
  label is the small model's and its message is done when that label is delivered: an audit holds no offset.
  Its task is kept, supervised, and awaited (bounded) at the end. Its cost counts in ``cost_usd`` (honest:
  it is money spent) and is also shown apart as ``audit_cost_usd``; the pair goes to the distill topic
  marked ``audit``.
- The drift alarm and the agreement figures read the small-path audits only. The adaptive rule reads the
  seeded sample of *every* routed review — the small-path audits and the chosen reviews the LLM answered
  anyway (free) — so its samples cover all confidences, not only those above the tau in force.
- The spend cap admits each LLM request (audits too) against a window of ``metrics.interval_s``. With
  ``budget.priority = "spend"`` a request the window cannot pay for takes the fallback (``budget``) and
  the cap lowers tau, to ``budget.min_threshold`` at most, so that the LLM's share goes to the least
  confident reviews; with ``"accuracy"`` the request goes anyway and ``budget_exceeded`` is logged, once a
  window, with the overspend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, Protocol

import structlog

from consumer import contracts
from consumer.aio import cancel_and_wait
from consumer.config import Settings
from consumer.kafka.sink import OnDelivered, Outgoing
from consumer.observe.meter import Meter, ratio
from consumer.records import LlmAnswer, LlmFailure, LlmOutcome, Scored
from consumer.stream import outputs
from consumer.stream.control import AdaptiveThreshold, Agreement, AuditSample, AuditSampler, DriftAlarm, SpendCap
from consumer.stream.risk import Interval

log = structlog.get_logger(__name__)
_ESTIMATE_MARGIN = 1.25  # the cap charges a request's prompt estimate with this margin, and a full reply
_MARGIN_S = 0.5  # an admission stays in the cap's window longer than a metrics window (a tenth, to 0.5 s): latency
_BUDGET_STEP, _BUDGET_LOW = 0.02, 0.7  # the cap lowers tau by a step while binding, raises it below this


class AuditPool(Protocol):
    """The LLM pool as the loop sees it."""

    async def label(
        self, scored: Scored, prompt: Literal["s4l", "plain"] = "s4l", *, audit: bool = False
    ) -> LlmOutcome: ...

    def backlog(self) -> int: ...

    def audit_backlog(self) -> int: ...


class Publisher(Protocol):
    def publish(self, out: Outgoing, on_delivered: OnDelivered) -> Awaitable[None]: ...


Watch = Callable[[asyncio.Task[Any], str], None]


@dataclass
class LoopCounts:
    """What the loop counts, per window and in total (the ``loop`` block of metrics.v1)."""

    decided_small: int = 0
    decided_llm: int = 0
    audits: int = 0
    audit_agreed: int = 0
    audit_skipped: int = 0
    audit_failed: int = 0
    audit_prompt_tokens: int = 0
    audit_completion_tokens: int = 0
    audit_cost_usd: float = 0.0
    budget_fallbacks: int = 0
    threshold_changes: int = 0

    def minus(self, other: LoopCounts) -> LoopCounts:
        return LoopCounts(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


def _interval(interval: Interval) -> dict[str, Any]:
    return {"agreed": interval.k, "n": interval.n, "estimate": interval.estimate, "low": interval.low,
            "high": interval.high}  # fmt: skip


class ClosedLoop:
    """See the module docstring. ``watch`` supervises each audit task (the pipeline's supervisor)."""

    def __init__(
        self, settings: Settings, *, pool: AuditPool, sink: Publisher, meter: Meter, watch: Watch,
        estimate: Callable[[str], int], clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._s, self._pool, self._sink, self._meter, self._watch = settings, pool, sink, meter, watch
        self._estimate, self._clock = estimate, clock
        audit, router, budget = settings.audit, settings.router, settings.budget
        self._sampler = AuditSampler(audit.rate, audit.seed)
        self.agreement = Agreement()
        self.alarm = DriftAlarm(audit.min_agreement, audit.window)
        self._adaptive = None
        if router.mode == "adaptive":
            self._adaptive = AdaptiveThreshold(router.threshold, router.max_error, router.risk_confidence,
                                               window=audit.window, every=10)  # fmt: skip
        interval = settings.metrics.interval_s
        margin = min(_MARGIN_S, interval / 10)
        self._cap = None if budget.usd_per_hour is None else SpendCap(budget.usd_per_hour, interval, clock,
                                                                      margin_s=margin)  # fmt: skip
        self._budget_tau, self._next_steer, self._next_exceeded_log = router.threshold, 0.0, 0.0
        self.in_force = self._last_risk = router.threshold
        self.counts, self._window_start = LoopCounts(), LoopCounts()
        self.pending = self._refused = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the threshold ---------------------------------------------------------------------------------
    def _risk_tau(self) -> float:
        return self._s.router.threshold if self._adaptive is None else self._adaptive.tau

    def threshold(self) -> float:
        """The tau in force: the risk rule's (fixed or adaptive), lowered by the spend cap if it binds."""
        tau = self._risk_tau()
        if self._cap is not None and self._s.budget.priority == "spend":
            now = self._clock()
            if now >= self._next_steer:
                self._steer(now, tau)
            tau = min(tau, self._budget_tau)
        if tau != self.in_force:
            risk = self._risk_tau()
            self._changed(self.in_force, tau, "risk" if risk != self._last_risk else "budget")
            self._last_risk = risk
        return tau

    def _steer(self, now: float, risk_tau: float) -> None:
        assert self._cap is not None
        self._next_steer = now + self._s.metrics.interval_s / 4  # a quarter window: let the cap see the change
        pressure, floor = self._cap.pressure(), self._s.budget.min_threshold
        binding, self._refused = self._refused > 0 or pressure >= 1.0, 0  # the cap turned reviews away
        if binding:
            self._budget_tau = round(max(floor, min(self._budget_tau, risk_tau) - _BUDGET_STEP), 6)
        elif pressure < _BUDGET_LOW:
            self._budget_tau = round(min(risk_tau, self._budget_tau + _BUDGET_STEP), 6)

    def _changed(self, old: float, new: float, cause: str) -> None:
        reason = f"{cause}_{'up' if new > old else 'down'}"
        pressure = None if self._cap is None else round(self._cap.pressure(), 4)
        log.info("threshold_changed", old=round(old, 6), new=round(new, 6), reason=reason, budget_pressure=pressure)
        self.in_force = new
        self.counts.threshold_changes += 1

    # -- decisions -------------------------------------------------------------------------------------
    def on_small(self, scored: Scored) -> None:
        """A small-path decision; a seeded share of them is audited in the background."""
        self.counts.decided_small += 1
        if not self._sampler.chosen(scored.review.id):
            return
        estimate = 0.0 if self._cap is None else self._price(scored)
        if self._pool.backlog() > self._s.llm.queue_low_water or not self._admit(estimate):
            self.counts.audit_skipped += 1
            return
        task = asyncio.create_task(self._audit(scored, estimate), name="audit-task")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._watch(task, "audit-task")

    async def label(self, scored: Scored) -> LlmOutcome:
        """An LLM-path decision: the spend cap admits it (or it falls back, ``budget``), then the pool asks."""
        self.counts.decided_llm += 1
        estimate = 0.0 if self._cap is None else self._price(scored)
        if not self._admit(estimate):
            self.counts.budget_fallbacks += 1
            self._refused += 1
            return LlmFailure("budget", "the spend cap's allowance for this window is used up")
        self.pending += 1
        try:
            outcome = await self._pool.label(scored)
        finally:
            self.pending -= 1
        if self._cap is not None:
            self._cap.correct(estimate, outcome.cost_usd)
        if isinstance(outcome, LlmAnswer) and self._sampler.chosen(scored.review.id):
            self._learn(scored.prediction.confidence, outcome.label == scored.prediction.label)
        return outcome

    def _price(self, scored: Scored) -> float:
        price, llm = self._s.llm.price(), self._s.llm
        prompt = self._estimate(scored.review.text) * _ESTIMATE_MARGIN
        return (prompt * price.input_per_mtok + llm.max_completion_tokens * price.output_per_mtok) / 1e6

    def _admit(self, estimate: float) -> bool:
        if self._cap is None:
            return True
        force = self._s.budget.priority == "accuracy"
        if self._cap.admit(estimate, force=force):
            return True
        if force:
            self._exceeded()
        return force

    def _exceeded(self) -> None:
        assert self._cap is not None
        now = self._clock()
        if now >= self._next_exceeded_log:  # once a window
            self._next_exceeded_log = now + self._s.metrics.interval_s
            spent = self._cap.spent()
            log.warning("budget_exceeded", over_usd=round(spent - self._cap.allowance, 9), spent_usd=round(spent, 9),
                        allowance_usd=round(self._cap.allowance, 9), window_s=self._s.metrics.interval_s)  # fmt: skip

    # -- audits ----------------------------------------------------------------------------------------
    async def _audit(self, scored: Scored, estimate: float) -> None:
        outcome = await self._pool.label(scored, "plain", audit=True)
        self._bill(outcome)
        if self._cap is not None:
            self._cap.correct(estimate, outcome.cost_usd)
        if isinstance(outcome, LlmFailure):
            if outcome.reason == "audit_skipped":
                self.counts.audit_skipped += 1
            else:
                self.counts.audit_failed += 1
            return
        agreed = outcome.label == scored.prediction.label
        self.counts.audits += 1
        self.counts.audit_agreed += agreed
        self.agreement.add(agreed)
        self._alarm(agreed)
        self._learn(scored.prediction.confidence, agreed)
        value = contracts.dumps(outputs.distill(scored, outcome, audit=True))
        out = Outgoing(self._s.topics.distill, scored.review.id, value, origin=scored.review.origin)
        await self._sink.publish(out, _nothing)  # origin: a record too big for the topic is dead-lettered

    def _bill(self, outcome: LlmOutcome) -> None:
        self._meter.on_billed(outcome.cost_usd)  # in cost_usd: audits are money spent
        self.counts.audit_cost_usd += outcome.cost_usd
        self.counts.audit_prompt_tokens += outcome.prompt_tokens
        self.counts.audit_completion_tokens += outcome.completion_tokens

    def _alarm(self, agreed: bool) -> None:
        change = self.alarm.update(agreed)
        if change is None:
            return
        interval = self.alarm.interval()
        log.warning("drift_alarm" if change else "drift_cleared", agreement=interval.estimate, low=interval.low,
                    high=interval.high, audits=interval.n, min_agreement=self.alarm.min_agreement)  # fmt: skip

    def _learn(self, confidence: float, agreed: bool) -> None:
        if self._adaptive is None:
            return
        move = self._adaptive.add(AuditSample(confidence, agreed))
        if move is not None:
            log.info("risk_target", old=move.old, new=move.new, target=move.target, reason=move.reason)
            self.threshold()  # the event and the counter, now

    async def close(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the audits in flight, then cancel the rest (their reviews are done)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(timeout_s, 0.0))
        left = len(self._tasks)
        await cancel_and_wait(self._tasks)
        log.info("audits_closed", abandoned=left, **asdict(self.counts))

    # -- metrics ---------------------------------------------------------------------------------------
    def report(self, close_window: bool) -> dict[str, Any]:
        """The ``loop`` block of metrics.v1; ``close_window`` starts a new window after it."""
        totals = replace(self.counts)
        window = totals.minus(self._window_start)
        block = {
            "mode": self._s.router.mode,
            "threshold": self.in_force,
            "routed_share": ratio(window.decided_llm, window.decided_small + window.decided_llm),
            "llm_pending": self.pending,
            "audit_backlog": self._pool.audit_backlog() if self._tasks else 0,
            "window": asdict(window) | {"agreement": _interval(self.agreement.window())},
            "totals": asdict(totals) | {"agreement": _interval(self.agreement.cumulative())},
            "drift_alarm": self.alarm.firing,
            "drift_recent": _interval(self.alarm.interval()),
            "budget": self._budget_block(),
        }
        if close_window:
            self._window_start = totals
            self.agreement.roll()
        return block

    def _budget_block(self) -> dict[str, Any] | None:
        if self._cap is None:
            return None
        budget = self._s.budget
        cap = self._cap
        return {"usd_per_hour": budget.usd_per_hour, "priority": budget.priority, "allowance_usd": cap.allowance,
                "spent_usd": cap.spent(), "pressure": cap.pressure(), "threshold": self._budget_tau}  # fmt: skip


def _nothing() -> None:
    """An audit's distill record finishes nothing: no offset waits for it."""
