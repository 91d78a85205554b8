"""Wires the stages together and owns their lifecycles (one AsyncExitStack). No pipeline logic lives here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from pathlib import Path

import structlog

from consumer.aio import background, signal_handlers
from consumer.config import Settings
from consumer.kafka.sink import KafkaSink
from consumer.llm.pool import LlmPool
from consumer.llm.prompting import estimate_prompt_tokens
from consumer.observe.meter import Meter
from consumer.observe.wiring import observability
from consumer.small.reload import ModelWatcher
from consumer.small.scoring import OnnxScorer, ScoringStage
from consumer.stream.pipeline import Parts, Pipeline

log = structlog.get_logger(__name__)


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


async def _watch_model(stack: contextlib.AsyncExitStack, settings: Settings, scoring: ScoringStage) -> None:
    if settings.model.watch_interval_s <= 0:
        return
    watcher = ModelWatcher(
        settings.model.path, settings.model.watch_interval_s, lambda p: load_scorer(settings, p), scoring.swap
    )
    await stack.enter_async_context(background(watcher.run(), "model-watcher"))


async def run_service(
    settings: Settings, stop: asyncio.Event | None = None, *, handle_signals: bool = True
) -> Pipeline:
    """Run until stopped (signal, ``max_messages``, idle timeout, or ``stop`` set by the caller).

    ``handle_signals=False`` leaves SIGTERM/SIGINT to a caller that embeds the service (the demo).
    Returns the pipeline for inspection."""
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        if handle_signals:
            stack.enter_context(signal_handlers(functools.partial(_on_signal, stop)))
        scoring = ScoringStage(load_scorer(settings))
        stack.callback(scoring.close)
        await _watch_model(stack, settings, scoring)
        sink = KafkaSink(settings.kafka)
        await sink.start()
        stack.push_async_callback(sink.close, settings.service.drain_timeout_s)
        pool = await stack.enter_async_context(LlmPool(settings.llm, drain_timeout_s=settings.service.drain_timeout_s))
        price = settings.llm.price()
        meter = Meter(price, settings.llm.max_completion_tokens)
        parts = Parts(sink=sink, scoring=scoring, llm=pool, meter=meter, estimate=estimate_prompt_tokens)
        pipeline = Pipeline(settings, parts)
        await stack.enter_async_context(
            observability(settings, meter, pipeline, pool, sink, model_version=lambda: scoring.scorer.version)
        )
        log.info("service_started", input=settings.topics.input, group=settings.kafka.group_id)
        await pipeline.run(stop)
    log.info("service_stopped", messages=pipeline.messages_read)
    return pipeline
