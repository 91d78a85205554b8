"""``shunt demo``: the whole pipeline on one machine, ending in what it cost and what it saved.

It starts an embedded Kafka-protocol broker (unless given a real one), creates topics unique to the run,
starts the stand-in LLM in-process as a noisy oracle, produces a stream of synthetic reviews with known
labels at a given rate, runs the real service on it until every review has its output, reads the outputs back
and scores them against the true labels (:mod:`consumer.sandbox.demo.summary` says how each number is made).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from consumer.aio import background, cancel_and_wait, signal_handlers, wait_until
from consumer.config import Settings, load_settings
from consumer.observe.meter import Meter
from consumer.sandbox.demo.options import DemoError, DemoOptions, RunInfo, check_model, demo_reviews, demo_settings
from consumer.sandbox.demo.reader import OutputReader
from consumer.sandbox.demo.stream import TICK_S, StreamProducer, create_topics, delete_run
from consumer.sandbox.demo.summary import Snapshot, Summary, View, summarise
from consumer.sandbox.demo.tally import Tally, make_truth, standin_config, write_labels
from consumer.sandbox.embedded_broker import EmbeddedBroker
from consumer.sandbox.standin import StandinServer, make_policy

log = structlog.get_logger(__name__)

_WARMUP_TIMEOUT_S = 90.0  # the first review waits for the group to form (about 3 s on Tansu)


def run_demo(options: DemoOptions, view: View) -> Summary:
    """Run the whole demo and return its summary. Every process and thread it starts is gone on return,
    also when it is interrupted: a first SIGINT/SIGTERM drains and summarises; a second, outside the
    service's own (bounded) drain, aborts with KeyboardInterrupt."""
    if options.reviews < 2:
        raise DemoError("the demo needs at least 2 reviews")
    check_model(load_settings().model.path)
    run_id = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"shunt-demo-{run_id}-")))
        run = RunInfo(options, run_id, options.bootstrap or "", options.bootstrap is None, workdir)
        if run.embedded:
            # Started here, on the main thread and outside the event loop: the kernel's parent-death signal
            # follows the thread that started it, and the broker outlives the loop's own teardown.
            broker = stack.enter_context(EmbeddedBroker(log_path=workdir / "tansu.log"))
            run.bootstrap, run.broker_alive = broker.bootstrap, broker.running
        try:
            return asyncio.run(Demo(run, view).run())
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None  # a second Ctrl-C: aborted, cleaned up, no summary


class Demo:
    """One run on the event loop: stand-in, topics, reader, producer and the service; see :func:`run_demo`."""

    def __init__(self, run: RunInfo, view: View) -> None:
        self.run_info, self.view = run, view
        self.phase = "starting"
        self.stop = asyncio.Event()
        self._main: asyncio.Task[Any] | None = None
        self._signalled = False
        self.broker_lost = False
        self._reinstall: Callable[[], None] = lambda: None
        self._standin: StandinServer | None = None
        self._tally: Tally | None = None

    async def run(self) -> Summary:
        self._main = asyncio.current_task()
        with signal_handlers(self._on_signal) as reinstall:
            self._reinstall = reinstall
            async with contextlib.AsyncExitStack() as stack:
                tally, settings = await self._start(stack)
                await stack.enter_async_context(background(self._tick(), "demo-progress"))
                reader = await stack.enter_async_context(
                    OutputReader(self.run_info.bootstrap, self.run_info.topics, tally)
                )
                producer = await stack.enter_async_context(StreamProducer(settings.kafka, settings.topics.input, tally))
                await self._stream(settings, producer)
                if self.broker_lost:
                    raise DemoError("the embedded broker exited during the demo; nothing more can be read back")
                self.phase = "reading the last outputs"
                self.run_info.complete = await reader.catch_up()
                self.run_info.interrupted = tally.labelled + tally.dlq < self.run_info.options.reviews
                assert self._standin is not None
                summary = summarise(tally, self.run_info, self._standin.stats())
                self.phase = "interrupted" if self.run_info.interrupted else "done"
                self.view.progress(self._snapshot())
        return summary

    async def _start(self, stack: contextlib.AsyncExitStack) -> tuple[Tally, Settings]:
        run = self.run_info
        reviews = demo_reviews(run.options)
        config = standin_config(run.options, write_labels(reviews, run.workdir / "labels.jsonl"))
        policy = make_policy(config)
        self.phase = "creating topics"
        partitions = run.topics.partitions(run.options.partitions)
        await asyncio.to_thread(create_topics, run.bootstrap, partitions)
        if not run.embedded:
            stack.push_async_callback(asyncio.to_thread, delete_run, run.bootstrap, list(partitions), run.group)
        self.phase = "starting the stand-in LLM"
        self._standin = StandinServer(config, policy)
        llm_url = await stack.enter_async_context(self._standin)
        settings = demo_settings(run, llm_url)
        meter = Meter(settings.llm.price(), settings.llm.max_completion_tokens)
        self._tally = Tally(make_truth(reviews, policy), meter)
        return self._tally, settings

    async def _stream(self, settings: Settings, producer: StreamProducer) -> None:
        """Feed the stream while the service runs, and stop the service once every review has its output."""
        from consumer.app import run_service  # noqa: PLC0415 - the heavy stages load only when the demo runs

        feeding = asyncio.create_task(self._feed(producer), name="demo-producer")
        feeding.add_done_callback(lambda _: self.stop.set())  # done, or failed: the service must not wait on
        try:
            self.phase = "starting the service"
            await run_service(settings, self.stop)
        finally:
            # The service's Kafka producer is closed only when its pipeline is collected (a reference
            # cycle): collect now, while the broker is still up, so it disconnects cleanly.
            gc.collect()
            self._reinstall()
            await cancel_and_wait([feeding])
        if not feeding.cancelled() and (error := feeding.exception()) is not None:
            raise error

    async def _feed(self, producer: StreamProducer) -> None:
        assert self._tally is not None
        tally, reviews = self._tally, self._tally.truth.reviews
        # One review first: the stream starts once the service has joined its group and labels.
        await producer.send(reviews[:1])
        self.phase = "waiting for the service to join its consumer group"
        joined = await wait_until(
            lambda: tally.labelled + tally.dlq > 0 or self.stop.is_set(), _WARMUP_TIMEOUT_S, tick_s=TICK_S
        )
        if not joined:
            raise DemoError(f"the service labelled nothing within {_WARMUP_TIMEOUT_S:.0f} s")
        self.phase = "streaming reviews"
        await producer.paced(reviews[1:], self.run_info.options.rate, self.stop)
        self.phase = "labelling the last reviews"
        # The demo, not max_messages, ends the service: max_messages starts the drain as soon as the last
        # review is read, and its deadline would cut off an LLM backlog that the rate limit is pacing.
        await wait_until(
            lambda: tally.labelled + tally.dlq >= len(reviews) or self.stop.is_set(), math.inf, tick_s=TICK_S
        )
        self.phase = "every review labelled: stopping the service"

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._signalled and self._main is not None:
            log.warning("demo_aborted", signal=sig.name)
            self._main.cancel()
            return
        self._signalled = True
        log.info("demo_stopping", signal=sig.name)
        self.phase = "stopping: finishing in-flight reviews (Ctrl-C again to abort)"
        self.stop.set()

    async def _tick(self) -> None:
        while True:
            self.view.progress(self._snapshot())
            if not self.broker_lost and not self.run_info.broker_alive():
                log.error("demo_broker_exited", bootstrap=self.run_info.bootstrap)
                self.broker_lost = True
                self.phase = "the embedded broker has exited: stopping"
                self.stop.set()
            await asyncio.sleep(TICK_S)  # a refresh period

    def _snapshot(self) -> Snapshot:
        assert self._tally is not None and self._standin is not None
        tally, stats = self._tally, self._standin.app.counters
        return Snapshot(
            phase=self.phase,
            total=self.run_info.options.reviews,
            produced=tally.produced,
            labelled=tally.labelled,
            small=tally.sources["small"],
            llm=tally.sources["large"] + tally.sources["fallback"],
            dlq=tally.dlq,
            spend_usd=tally.meter.totals.cost_usd,
            baseline_usd=tally.meter.totals.baseline_cost_usd,
            llm_requests=stats["requests"],
            llm_429s=stats["rate_limited_sent"],
            elapsed_s=time.monotonic() - self.run_info.started,
            by_batch=tally.lanes["batch"],
        )
