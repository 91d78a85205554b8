"""Wires the stages together and owns their lifecycles (one AsyncExitStack). No pipeline logic lives here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import threading
from pathlib import Path

import structlog

from consumer.aio import background, signal_handlers
from consumer.config import Settings
from consumer.errors import ExitCode
from consumer.kafka.preflight import check_topics
from consumer.kafka.sink import KafkaSink
from consumer.llm.pool import LlmPool
from consumer.llm.prompting import estimate_prompt_tokens
from consumer.observe.meter import Meter
from consumer.observe.wiring import observability
from consumer.small.reload import ModelWatcher
from consumer.small.scoring import OnnxScorer, ScoringStage
from consumer.stream.batchlane import BatchLane
from consumer.stream.pipeline import Parts, Pipeline

log = structlog.get_logger(__name__)
_POOL_DRAIN_S = 1.0
_FORCED_EXIT_MARGIN_S = 4.5  # the process ends within drain_timeout_s + 5 s of a signal, whatever it is doing


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("stopping", signal=sig.name)
    stop.set()


def load_scorer(settings: Settings, path: Path | None = None) -> OnnxScorer:
    model = settings.model
    return OnnxScorer.load(
        path or model.path,
        max_tokens=model.max_tokens,
        intra_op_threads=model.intra_op_threads,
        inter_op_threads=model.inter_op_threads,
    )


def scoring_stage(settings: Settings) -> ScoringStage:
    """The scoring hop as configured: the model folder on ``model.workers`` threads."""
    return ScoringStage(load_scorer(settings), workers=settings.model.workers)


async def _watch_model(stack: contextlib.AsyncExitStack, settings: Settings, scoring: ScoringStage) -> None:
    if settings.model.watch_interval_s <= 0:
        return
    watcher = ModelWatcher(
        settings.model.path, settings.model.watch_interval_s, lambda p: load_scorer(settings, p), scoring.swap
    )
    await stack.enter_async_context(background(watcher.run(), "model-watcher"))


def _started_since(before: set[asyncio.Task[object]]) -> list[asyncio.Task[object]]:
    """The named tasks started since ``before``: the parts' own loops (workers, emitter, watcher)."""
    current = asyncio.current_task()
    started = asyncio.all_tasks() - before - {current}
    return sorted((t for t in started if not t.get_name().startswith("Task-")), key=asyncio.Task.get_name)


async def _force_exit_after_halt(stop: asyncio.Event, pipeline: Pipeline, seconds: float) -> None:
    """Once a signal or a failure asks to stop, end the process after ``seconds`` even if shutdown hangs.

    A thread, so it fires while the event loop is blocked too."""
    halted = asyncio.create_task(pipeline.supervisor.failed.wait())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([halted, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (halted, stopped):
            task.cancel()
    timer = threading.Timer(seconds, _forced_exit, args=(seconds,))
    timer.daemon = True
    timer.start()


def _forced_exit(seconds: float) -> None:
    log.error("shutdown_forced", seconds=seconds)
    os._exit(ExitCode.FATAL)


async def _supervise(
    stack: contextlib.AsyncExitStack,
    pipeline: Pipeline,
    before: set[asyncio.Task[object]],
    stop: asyncio.Event,
    drain_timeout_s: float | None,
) -> None:
    """Watch every task the parts started; with a drain timeout, also end the process if a stop hangs."""
    started = _started_since(before)
    for task in started:
        pipeline.supervisor.watch(task, task.get_name())
    log.info("supervising", tasks=sorted({task.get_name() for task in started}))
    if drain_timeout_s is not None:
        seconds = drain_timeout_s + _FORCED_EXIT_MARGIN_S
        await stack.enter_async_context(background(_force_exit_after_halt(stop, pipeline, seconds), "deadline"))


async def run_service(
    settings: Settings, stop: asyncio.Event | None = None, *, handle_signals: bool = True, hard_deadline: bool = False
) -> Pipeline:
    """Run until stopped (signal, ``max_messages``, idle timeout, a part that fails, or ``stop`` set by the caller).

    ``handle_signals=False`` leaves SIGTERM/SIGINT to a caller that embeds the service (the demo).
    ``hard_deadline=True`` (the ``shunt run`` process) ends the process ``drain_timeout_s`` + 5 s after a
    signal or a failure even if the shutdown hangs. Returns the pipeline: ``failure`` and ``unfinished``."""
    stop = stop or asyncio.Event()
    before = asyncio.all_tasks()
    lane_on = settings.llm.lane != "online"
    await asyncio.to_thread(check_topics, settings.kafka, settings.topics, deferred=lane_on)
    async with contextlib.AsyncExitStack() as stack:
        if handle_signals:
            stack.enter_context(signal_handlers(functools.partial(_on_signal, stop)))
        scoring = scoring_stage(settings)
        stack.callback(scoring.close)
        await _watch_model(stack, settings, scoring)
        sink = KafkaSink(settings.kafka)
        await sink.start()
        stack.push_async_callback(sink.close, settings.service.drain_timeout_s)
        # When the pool closes, the pipeline and the lane wait for none of its answers any more: a short drain.
        pool = await stack.enter_async_context(LlmPool(settings.llm, drain_timeout_s=_POOL_DRAIN_S))
        price = settings.llm.price()
        meter = Meter(price, settings.llm.max_completion_tokens)
        lane = BatchLane(settings, sink, meter, pool)
        parts = Parts(sink=sink, scoring=scoring, llm=pool, meter=meter, estimate=estimate_prompt_tokens,
                      deferrer=lane.deferrer)  # fmt: skip
        pipeline = Pipeline(settings, parts)
        version = lambda: scoring.scorer.version  # noqa: E731
        await stack.enter_async_context(
            observability(settings, meter, pipeline, pool, sink, model_version=version, loop=pipeline.loop)
        )
        await stack.enter_async_context(lane.running(lambda: pipeline.halted))
        await _supervise(stack, pipeline, before, stop, settings.service.drain_timeout_s if hard_deadline else None)
        log.info("service_started", input=settings.topics.input, group=settings.kafka.group_id)
        await pipeline.run(stop)
    log.info("service_stopped", messages=pipeline.messages_read, unfinished=pipeline.unfinished)
    return pipeline
