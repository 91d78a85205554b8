"""The metrics emitter: one ``metrics.v1`` message per window to the metrics topic, and a final one at exit.

``async with MetricsEmitter(probe, topic, interval_s):`` publishes a window every ``interval_s`` (monotonic
deadlines, so windows do not drift) keyed by the instance id. On exit it publishes the last window with
``"final": true`` and waits for the broker to acknowledge it. Enter it before the pipeline runs and leave it
after the pipeline has drained, while the sink is still open: the final totals then reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType
from typing import Any

import structlog

from consumer import contracts
from consumer.kafka.sink import Outgoing
from consumer.observe.meter import Window, cost_ratio, shunt_rate
from consumer.observe.probe import Probe, Reading, ServiceInfo
from consumer.observe.rates import now_block

log = structlog.get_logger(__name__)
_FINAL_ACK_TIMEOUT_S = 10.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def metrics_message(
    info: ServiceInfo, seq: int, *, final: bool, span_ms: tuple[int, int], closed: Window, reading: Reading
) -> dict[str, Any]:
    """One metrics.v1 message from a closed window and the state read at its end."""
    totals = closed.totals
    message = {
        "schema_version": "metrics.v1",
        "instance_id": info.instance_id,
        "group_id": info.group_id,
        "seq": seq,
        "final": final,
        "window_start_ms": span_ms[0],
        "window_end_ms": span_ms[1],
        "window": closed.window.as_dict(),
        "totals": totals.as_dict(),
        "shunt_rate": shunt_rate(totals),
        "cost_ratio": cost_ratio(totals),
        "breaker_state": reading.breaker_state,
        "latency_ms": closed.latency,
        "queues": reading.queues,
        "lag": reading.lag,
        "threshold": info.threshold,
        "model_version": reading.model_version or "unknown",
        "prompt_version": info.prompt_version,
        "llm_model": info.llm_model,
        "now": now_block(closed.window, (span_ms[1] - span_ms[0]) / 1000, reading.loop),
    }
    if reading.loop is not None:
        message |= {"loop": reading.loop, "threshold": reading.loop["threshold"]}  # the tau in force
    return message


class MetricsEmitter:
    """Publishes the probe's meter to ``topic`` every ``interval_s``; see the module docstring."""

    def __init__(self, probe: Probe, topic: str, interval_s: float) -> None:
        self._probe = probe
        self._topic = topic
        self._interval_s = interval_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._window_start_ms = _now_ms()
        self._final_acked = asyncio.Event()
        self.seq = 0

    async def __aenter__(self) -> MetricsEmitter:
        self._window_start_ms = _now_ms()
        self._task = asyncio.create_task(self._run(), name="metrics-emitter")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self._emit_final()

    async def _run(self) -> None:
        deadline = time.monotonic() + self._interval_s
        while not await self._stopped_within(deadline - time.monotonic()):
            await self._emit_logged()
            now = time.monotonic()
            deadline = max(deadline + self._interval_s, now)  # after a stall, skip the missed ticks

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(seconds, 0.0))
        return self._stop.is_set()

    async def _emit_logged(self) -> None:
        # The metrics must never stop the labelling: a failed window is logged and the next one carries on.
        try:
            await self.emit(final=False)
        except Exception:
            log.exception("metrics_emit_failed", topic=self._topic, seq=self.seq)

    async def _emit_final(self) -> None:
        try:
            await self.emit(final=True)
        except Exception:
            log.exception("metrics_emit_failed", topic=self._topic, seq=self.seq, final=True)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._final_acked.wait(), _FINAL_ACK_TIMEOUT_S)
        if not self._final_acked.is_set():
            log.warning("metrics_final_unacknowledged", topic=self._topic, seconds=_FINAL_ACK_TIMEOUT_S)

    async def emit(self, final: bool) -> dict[str, Any]:
        """Close the window, validate its message against metrics.v1 and publish it; returns the message."""
        closed, reading = self._probe.close_window()
        end_ms = max(_now_ms(), self._window_start_ms)
        seq, info = self.seq, self._probe.info
        span = (self._window_start_ms, end_ms)
        message = metrics_message(info, seq, final=final, span_ms=span, closed=closed, reading=reading)
        contracts.validate("metrics", message)
        self._window_start_ms, self.seq = end_ms, seq + 1
        self._probe.handed_over(seq)
        out = Outgoing(self._topic, info.instance_id, contracts.dumps(message), (("shunt-metrics-seq", b"%d" % seq),))
        try:
            await self._probe.sink.publish(out, lambda: self._on_acknowledged(seq, final))
        except BaseException:
            self._probe.acknowledged(seq)  # never handed over: it must not count as waiting for the broker
            raise
        log.debug("metrics_emitted", seq=seq, final=final, reviews_in=closed.window.reviews_in)
        return message

    def _on_acknowledged(self, seq: int, final: bool) -> None:
        self._probe.acknowledged(seq)
        if final:
            self._final_acked.set()
