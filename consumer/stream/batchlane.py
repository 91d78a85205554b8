"""The batch lane's wiring: beside the pipeline in ``shunt run`` (:class:`BatchLane`), or alone (``shunt batch``,
:func:`run_alone`). Either way the stage finishes its batches on a batch stop and leaves them to the next run
on a halt (a signal or a failure): a restarted stage finds them by their metadata key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import structlog

from consumer.aio import signal_handlers, wait_until
from consumer.config import Settings
from consumer.kafka.sink import KafkaSink
from consumer.llm.batch import BatchApi
from consumer.llm.pool import LlmPool
from consumer.observe.meter import Meter
from consumer.stream.batchout import OnlineLabeler
from consumer.stream.deferral import NO_DEFERRAL, Deferrer, Deferring
from consumer.stream.deferred import BatchStage

log = structlog.get_logger(__name__)


class BatchLane:
    """The pipeline's hook (:attr:`deferrer`: :data:`NO_DEFERRAL` for ``llm.lane = online``) and, with
    ``batch.in_service``, the batch stage beside the pipeline (:meth:`running`)."""

    def __init__(self, settings: Settings, sink: KafkaSink, meter: Meter, online: OnlineLabeler | None) -> None:
        self._s, self._sink, self._meter, self._online = settings, sink, meter, online
        self.deferrer: Deferring = NO_DEFERRAL if settings.llm.lane == "online" else Deferrer(settings, sink)

    @contextlib.asynccontextmanager
    async def running(self, halted: Callable[[], bool]) -> AsyncIterator[BatchStage | None]:
        """Run the stage for the life of the block. On exit after a batch stop it finishes what it has (for
        at most ``service.batch_drain_timeout_s``); after a halt (``halted()``, or an error) it stops at once
        and leaves the batches in flight to the next run. Entered after the metrics emitter, so the final
        metrics window counts what the stage published while finishing."""
        settings = self._s
        if settings.llm.lane == "online" or not settings.batch.in_service:
            yield None
            return
        stop = asyncio.Event()
        async with BatchApi(settings.llm) as api:
            stage = BatchStage(settings, self._sink, self._meter, api, self._online)
            task = asyncio.create_task(stage.run(stop), name="batch-stage")
            try:
                yield stage
            except BaseException:
                stop.set()
                await asyncio.wait([task])
                raise
            if halted():
                stop.set()
            await finish(stage, task, stop, settings.service.batch_drain_timeout_s)


async def finish(stage: BatchStage, task: asyncio.Task[None], stop: asyncio.Event, limit_s: float | None) -> None:
    """Let the stage publish everything it has read (``limit_s`` None: however long it takes; else stop it
    after that long). With ``stop`` set it ends at once."""
    stage.finishing.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=limit_s)
    except TimeoutError:
        log.warning("batch_stage_unfinished", seconds=limit_s, in_flight=stage.tracker.in_flight())
        stop.set()
        await asyncio.wait([task])


async def run_alone(settings: Settings) -> BatchStage:
    """``shunt batch``: the stage with a sink, a meter and (for ``on_item_failure = online``) an online pool of
    its own, until SIGTERM/SIGINT or, with ``service.idle_timeout_s``, until it is idle and finished."""
    stop = asyncio.Event()
    drain_s = settings.service.drain_timeout_s
    with signal_handlers(lambda _sig: stop.set()):
        sink = KafkaSink(settings.kafka)
        await sink.start()
        try:
            async with BatchApi(settings.llm) as api, LlmPool(settings.llm, drain_timeout_s=drain_s) as pool:
                meter = Meter(settings.llm.price(), settings.llm.max_completion_tokens)
                stage = BatchStage(settings, sink, meter, api, pool)
                task = asyncio.create_task(stage.run(stop), name="batch-stage")
                log.info("batch_stage_started", topic=settings.topics.deferred, group=stage.group)
                await _until_idle(stage, task, stop, settings.service.idle_timeout_s)
                await finish(stage, task, stop, settings.service.batch_drain_timeout_s)
        finally:
            await sink.close(drain_s)
    log.info("batch_stage_done", published=stage.out.published, costs=meter.lane_costs())
    return stage


async def _until_idle(stage: BatchStage, task: asyncio.Task[None], stop: asyncio.Event, idle_s: float | None) -> None:
    """Return once ``stop`` is set, the stage ended, or nothing new arrived for ``idle_s``."""

    def idle() -> bool:
        quiet = idle_s is not None and time.monotonic() - stage.last_message >= idle_s
        return stop.is_set() or task.done() or quiet

    while not await wait_until(idle, 3600.0):
        pass
