"""The probe: reads the service's live state (LLM pool, queues, lag, model) for the metrics.

The metrics topic, ``/metrics`` and ``/readyz`` all read through one :class:`Probe`, so they report the same
numbers. It reads the pipeline, the pool and the sink through the small ``*View`` protocols below, and the
counts from the :class:`~consumer.observe.meter.Meter`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from consumer.config import Settings
from consumer.kafka.sink import OnDelivered, Outgoing
from consumer.llm.prompting import S4L_NOHINT_V1, S4L_V2
from consumer.observe.meter import Counts, Meter, PoolCountersView, Window
from consumer.records import TopicPartition as TP


class PoolStatsView(PoolCountersView, Protocol):
    """The LLM pool's ``stats()`` snapshot, as far as the metrics read it."""

    @property
    def timeouts(self) -> int: ...
    @property
    def cost_usd(self) -> float: ...
    @property
    def breaker_state(self) -> str: ...
    @property
    def breaker_transitions(self) -> int: ...
    @property
    def backlog(self) -> int: ...


class PoolView(Protocol):
    def stats(self) -> PoolStatsView: ...


class TrackerView(Protocol):
    def in_flight(self, tps: list[TP] | None = None) -> int: ...

    def watermarks(self) -> dict[TP, int]: ...


class SourceView(Protocol):
    @property
    def closed(self) -> bool: ...

    def assignment(self) -> list[TP]: ...

    def lag(self, stored: dict[TP, int]) -> dict[TP, int]: ...


class PipelineView(Protocol):
    @property
    def tracker(self) -> TrackerView: ...
    @property
    def source(self) -> SourceView: ...


class SinkView(Protocol):
    def publish(self, out: Outgoing, on_delivered: OnDelivered) -> Awaitable[None]: ...

    def pending(self) -> int: ...


ModelVersion = Callable[[], str | None]
"""The loaded small model's version, or None while none is loaded."""


class LoopView(Protocol):
    """The closed loop (:class:`consumer.stream.loop.ClosedLoop`): its ``loop`` block of metrics.v1."""

    def report(self, close_window: bool) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ServiceInfo:
    """What identifies an instance and its configuration in every metrics message."""

    instance_id: str
    group_id: str
    threshold: float
    prompt_version: str
    llm_model: str

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceInfo:
        return cls(
            instance_id=settings.metrics.instance_id,
            group_id=settings.kafka.group_id,
            threshold=settings.router.threshold,
            prompt_version=S4L_V2 if settings.llm.hint else S4L_NOHINT_V1,
            llm_model=settings.llm.model,
        )


@dataclass(frozen=True)
class Reading:
    """Everything a metrics message or a scrape reports, read at one moment."""

    totals: Counts
    breaker_state: str
    breaker_transitions: int
    llm_timeouts: int
    llm_billed_usd: float
    queues: dict[str, int]
    lag: dict[str, int]
    model_version: str | None
    loop: dict[str, Any] | None = None  # the closed loop's block (audits, agreement, tau, budget)


class Probe:
    """Reads the service's live state for the metrics topic, ``/metrics`` and ``/readyz``."""

    def __init__(
        self,
        info: ServiceInfo,
        meter: Meter,
        pipeline: PipelineView,
        pool: PoolView,
        sink: SinkView,
        *,
        model_version: ModelVersion,
        loop: LoopView | None = None,
    ) -> None:
        self.info, self.meter, self.sink, self.loop = info, meter, sink, loop
        self._pipeline, self._pool, self._model_version = pipeline, pool, model_version
        self._last_lag: dict[str, int] = {}
        self._unacked: dict[int, float] = {}  # metrics message seq -> monotonic time it was handed over

    def healthy(self) -> bool:
        """False once the service is stopping on a failure (a part died, a permanent error): ``/healthz``."""
        check = getattr(self._pipeline, "healthy", None)  # a pipeline without supervision is always healthy
        return True if check is None else bool(check())

    def read(self) -> Reading:
        """The running totals and the state around them, without closing the window."""
        stats = self._pool.stats()
        loop = None if self.loop is None else self.loop.report(close_window=False)
        return replace(self._state(stats), totals=self.meter.peek(stats), loop=loop)

    def close_window(self) -> tuple[Window, Reading]:
        """Close the meter's window and read the state at its end."""
        stats = self._pool.stats()
        state = self._state(stats)  # first: should a read fail, no window is lost
        window = self.meter.close(stats)
        loop = None if self.loop is None else self.loop.report(close_window=True)
        return window, replace(state, totals=window.totals, loop=loop)

    def _state(self, stats: PoolStatsView) -> Reading:
        return Reading(
            totals=Counts(),
            breaker_state=stats.breaker_state,
            breaker_transitions=stats.breaker_transitions,
            llm_timeouts=stats.timeouts,
            llm_billed_usd=stats.cost_usd,
            queues=self.queues(stats),
            lag=self.lag(),
            model_version=self._model_version(),
        )

    def queues(self, stats: PoolStatsView) -> dict[str, int]:
        """Depths: LLM backlog (queued or being asked), reviews in flight, producer queue."""
        in_flight = self._pipeline.tracker.in_flight()
        return {"llm_backlog": stats.backlog, "in_flight": in_flight, "producer_queue": self.sink.pending()}

    def lag(self) -> dict[str, int]:
        """Messages not yet done per assigned partition, keyed ``topic/partition``; the last known once closed."""
        source = self._pipeline.source
        if not source.closed:
            marks = self._pipeline.tracker.watermarks()
            self._last_lag = {f"{t}/{p}": n for (t, p), n in sorted(source.lag(marks).items())}
        return dict(self._last_lag)

    def model_version(self) -> str | None:
        return self._model_version()

    def llm_ready(self) -> bool:
        """False while the LLM refuses our credentials (401/403): the service is misconfigured (``/readyz``)."""
        return not getattr(self._pool.stats(), "auth_failed", False)

    def assignment(self) -> list[TP]:
        source = self._pipeline.source
        return [] if source.closed else source.assignment()

    # The broker is reachable while it acknowledges our metrics messages in time.
    def handed_over(self, seq: int) -> None:
        self._unacked[seq] = time.monotonic()

    def acknowledged(self, seq: int) -> None:
        self._unacked.pop(seq, None)

    def unacked_for(self) -> float | None:
        """Seconds the oldest unacknowledged metrics message has waited; None when none waits."""
        return time.monotonic() - min(self._unacked.values()) if self._unacked else None
