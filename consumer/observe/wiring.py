"""One line for the app to start the metrics emitter and the admin server, and stop them in order.

    obs = await stack.enter_async_context(
        observability(settings, meter, pipeline, pool, sink, model_version=lambda: scoring.version)
    )

Enter it after the pipeline is built and before it runs; it exits before the sink closes (the stack is
LIFO), so the final metrics message goes out after the pipeline drained. The admin server stops last, so
``/metrics`` still answers while the final window is published.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from consumer.config import Settings
from consumer.observe.emitter import MetricsEmitter
from consumer.observe.http import AdminServer
from consumer.observe.meter import Meter
from consumer.observe.probe import LoopView, ModelVersion, PipelineView, PoolView, Probe, ServiceInfo, SinkView

_MIN_STALE_S = 15.0


@dataclass(frozen=True)
class Observability:
    """The running parts: ``admin`` is None when ``admin.enabled`` is false."""

    probe: Probe
    emitter: MetricsEmitter
    admin: AdminServer | None


@contextlib.asynccontextmanager
async def observability(
    settings: Settings,
    meter: Meter,
    pipeline: PipelineView,
    pool: PoolView,
    sink: SinkView,
    *,
    model_version: ModelVersion,
    loop: LoopView | None = None,
) -> AsyncIterator[Observability]:
    """Start the admin server (if enabled) and the metrics emitter; stop the emitter first, with its final window."""
    info = ServiceInfo.from_settings(settings)
    probe = Probe(info, meter, pipeline, pool, sink, model_version=model_version, loop=loop)
    interval = settings.metrics.interval_s
    async with contextlib.AsyncExitStack() as stack:
        admin = None
        if settings.admin.enabled:
            # Unready once a metrics message waits for the broker longer than a few windows.
            stale = max(3 * interval, _MIN_STALE_S)
            admin = await stack.enter_async_context(AdminServer(probe, settings.admin.host, settings.admin.port, stale))
        emitter = await stack.enter_async_context(MetricsEmitter(probe, settings.topics.metrics, interval))
        yield Observability(probe, emitter, admin)
