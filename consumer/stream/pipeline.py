"""The shunt pipeline: fetch -> decode -> score (micro-batches) -> route -> publish or ask the LLM -> done.

Two loops joined by a small bounded queue: the fetch loop reads and decodes while the score loop keeps up to
two batches scoring on the model's worker threads and routes the one before them; a batch's small-path
outputs go to the sink together. Uncertain reviews become tasks awaiting the LLM pool; every task is
kept and awaited. A message is done when every message it produced is delivered; only then can its
offset be stored, and only once every earlier offset of its partition is done too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from consumer import contracts
from consumer.aio import cancel_and_wait, wait_until
from consumer.config import Settings
from consumer.errors import BadInputError, FatalError
from consumer.kafka.message import Message, origin_of
from consumer.kafka.sink import Outgoing
from consumer.kafka.source import KafkaSource
from consumer.records import LlmAnswer, LlmFailure, LlmOutcome, Origin, Review, Scored
from consumer.records import TopicPartition as TP
from consumer.stream import outputs
from consumer.stream.completion import Completion
from consumer.stream.decoding import decode
from consumer.stream.loop import ClosedLoop
from consumer.stream.offsets import OffsetTracker
from consumer.stream.parts import Labeler, Parts, Scoring, TokenEstimator
from consumer.stream.routing import Route, on_give_up, route
from consumer.stream.supervisor import Supervisor

__all__ = ["Labeler", "Parts", "Pipeline", "Scoring", "TokenEstimator"]

log = structlog.get_logger(__name__)
_IDLE_POLL_S = 0.2
_SCORE_QUEUE = 1  # fetched batches waiting for the scorer, beyond the two it scores: more only adds latency
# (measured: 4 -> 1 took the small-path p99 at half load 276 -> 146 ms and the service 7,553 -> 9,759/s, BENCHMARKS.md)


_Completion = Completion  # the old name, which ops/bench/glue.py measures


class Pipeline:
    """Owns the offset tracker and the flow; the app owns the parts' lifecycles."""

    def __init__(self, settings: Settings, parts: Parts) -> None:
        self._s = settings
        self._sink, self._scoring, self._llm = parts.sink, parts.scoring, parts.llm
        self._meter, self._estimate, self._deferrer = parts.meter, parts.estimate, parts.deferrer
        self.tracker = OffsetTracker()
        self.source = KafkaSource(settings.kafka, [settings.topics.input], self, settings.service.drain_timeout_s)
        self._batches: asyncio.Queue[list[Review] | None] = asyncio.Queue(_SCORE_QUEUE)
        self._llm_tasks: set[asyncio.Task[None]] = set()
        self._progress = asyncio.Event()
        self._paused = False
        self._sizes: dict[tuple[str, int, int], int] = {}  # bytes of each message read and not yet done
        self.in_flight_bytes = 0
        self._partitions = 0
        self.messages_read = 0
        self.unfinished = 0  # messages read but not done when the run ended: read again after a restart
        self.assigned = asyncio.Event()
        self.supervisor = Supervisor()
        self.loop = ClosedLoop(settings, pool=parts.llm, sink=parts.sink, meter=parts.meter,
                               watch=self.supervisor.watch_errors, estimate=parts.estimate)  # fmt: skip
        self._stop_at: float | None = None
        self._drained = False

    def healthy(self) -> bool:
        """False once a part of the service died or a permanent error stopped it (``/healthz``)."""
        return self.supervisor.healthy()

    @property
    def failure(self) -> FatalError | None:
        return self.supervisor.failure

    @property
    def halted(self) -> bool:
        """A signal or a failure stopped the run (not max_messages or the idle timeout)."""
        return self._stop_at is not None

    # -- lifecycle -------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, a part fails, ``max_messages`` were read or the stream stays idle;
        then drain: a batch stop waits for every message read (``batch_drain_timeout_s``), a signal or a
        failure waits ``drain_timeout_s`` at most."""
        self._watch_sink()
        self._sink.rescue_with(outputs.DeadLetters(self._s.topics.dlq, self._s.metrics.instance_id))
        await self._sink.learn_limits([self._s.topics.output, self._s.topics.dlq, self._s.topics.distill])
        await self.source.start()
        self._partitions = await asyncio.get_running_loop().run_in_executor(
            None, self.source.partition_count, self._s.topics.input
        )
        scorer = asyncio.create_task(self._score_loop(), name="score-loop")
        storer = asyncio.create_task(self._store_loop(stop), name="offset-store")
        for task in (scorer, storer):
            self.supervisor.watch_errors(task, task.get_name())
        try:
            await self._fetch_loop(stop)
        except FatalError as exc:
            self.supervisor.fail(exc)
        except Exception as exc:  # a bug in the loop itself: stop like any dead task, never wait forever
            self.supervisor.fail(FatalError("fetch-loop", repr(exc)), exc)
        finally:
            await self._end_scoring(scorer, stop)
            await self._drain(stop)
            await self.loop.close(self._deadline() - time.monotonic())  # audits: done reviews, bounded wait
            await cancel_and_wait([storer])
            await self.supervisor.close()
            await self._finish()

    def _watch_sink(self) -> None:
        self.supervisor.watch_event(self._sink.fatal_event, lambda: self._sink.fatal, "sink")

    def _halting(self, stop: asyncio.Event) -> bool:
        """A signal or a failure asked to stop (a batch stop is not one: it finishes its work)."""
        halting = stop.is_set() or not self.supervisor.healthy()
        if halting and self._stop_at is None:
            self._stop_at = time.monotonic()
        return halting

    def _deadline(self) -> float:
        return (self._stop_at or time.monotonic()) + self._s.service.drain_timeout_s

    async def _end_scoring(self, scorer: asyncio.Task[None], stop: asyncio.Event) -> None:
        """Let the score loop finish the batches it has; a halt bounds that by the drain deadline."""
        if scorer.done():
            return
        try:
            async with asyncio.timeout_at(self._loop_time(self._deadline()) if self._halting(stop) else None):
                await self._batches.put(None)
                await asyncio.wait([scorer])
        except TimeoutError:
            log.warning("score_loop_abandoned", batches=self._batches.qsize())
            await cancel_and_wait([scorer])

    async def _drain(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        if not self._halting(stop):
            limit = self._s.service.batch_drain_timeout_s
            until = started + limit if limit is not None else float("inf")
            await self._wait_until(lambda: self.tracker.in_flight() == 0 or self._halting(stop), until)
        if self._halting(stop):
            await self._wait_until(lambda: self.tracker.in_flight() == 0, self._deadline())
        self.unfinished = self.tracker.in_flight()
        self._drained = True
        await cancel_and_wait(self._llm_tasks)  # what is left is abandoned: not committed, so re-read after a restart
        log.info("drained", seconds=round(time.monotonic() - started, 3), abandoned=self.unfinished)

    async def _finish(self) -> None:
        self.source.store(self.tracker.to_store())
        marks = self.tracker.watermarks()
        await self.source.commit(marks)
        log.info("offsets_committed", offsets={f"{t}/{p}": o for (t, p), o in marks.items()})
        await self._sink.flush(max(self._deadline() - time.monotonic(), 1.0))
        await self.source.close()

    @staticmethod
    def _loop_time(deadline: float) -> float:
        """A monotonic deadline on the event loop's clock."""
        return asyncio.get_running_loop().time() + deadline - time.monotonic()

    # -- fetch -----------------------------------------------------------------------------------------
    async def _fetch_loop(self, stop: asyncio.Event) -> None:
        service = self._s.service
        idle_since = time.monotonic()
        while not self._halting(stop):
            if service.max_messages is not None and self.messages_read >= service.max_messages:
                log.info("max_messages_reached", count=self.messages_read)
                return
            self._apply_backpressure()
            wait = self._s.model.batch_max_wait_ms / 1000 if not self._paused else _IDLE_POLL_S
            messages = await self.source.poll(self._s.model.batch_size, max(wait, 0.001))
            if messages or not self.tracker.owned():
                idle_since = time.monotonic()  # idle only counts while partitions are ours
                await self._accept(messages)
            elif self._idle_for(idle_since):
                log.info("idle_timeout", seconds=service.idle_timeout_s)
                return

    def _idle_for(self, since: float) -> bool:
        limit = self._s.service.idle_timeout_s
        return limit is not None and time.monotonic() - since >= limit and self.tracker.in_flight() == 0

    async def _accept(self, messages: list[Message]) -> None:
        reviews: list[Review] = []
        for message in messages:
            origin = origin_of(message)
            if not self.tracker.read((origin.topic, origin.partition), origin.offset):
                continue
            self.messages_read += 1
            self._meter.on_input()
            self._count_bytes(origin, len(message.value() or b""))
            try:
                reviews.append(decode(message.value(), origin, self._s.service.max_text_bytes))
            except BadInputError as exc:
                await self._dead_letter(exc.reason, exc.detail, origin, message.value())
        if reviews:
            await self._put_batch(reviews)

    async def _put_batch(self, reviews: list[Review]) -> None:
        """Hand a batch to the score loop; give up once a failure stops the run (the score loop may be dead)."""
        try:
            self._batches.put_nowait(reviews)
            return
        except asyncio.QueueFull:
            pass
        put = asyncio.ensure_future(self._batches.put(reviews))
        failed = asyncio.ensure_future(self.supervisor.failed.wait())
        await asyncio.wait([put, failed], return_when=asyncio.FIRST_COMPLETED)
        await cancel_and_wait([put, failed])  # a batch not handed over is not done: it is read again

    def _count_bytes(self, origin: Origin, size: int) -> None:
        key = (origin.topic, origin.partition, origin.offset)
        self.in_flight_bytes += size - self._sizes.get(key, 0)
        self._sizes[key] = size

    def _over_bytes(self, fraction: float) -> bool:
        """Whether the bytes in flight, or in the LLM backlog, reached ``fraction`` of their budget."""
        over_llm = self._llm.backlog_bytes() >= self._s.llm.max_queue_bytes * fraction
        return over_llm or self.in_flight_bytes >= self._s.service.max_in_flight_bytes * fraction

    def _apply_backpressure(self) -> None:
        llm, service = self._s.llm, self._s.service
        backlog, in_flight = self._deferrer.pausing_backlog(self._llm.backlog()), self.tracker.in_flight()
        full = backlog >= llm.queue_high_water or in_flight >= service.max_in_flight or self._over_bytes(1.0)
        drained = backlog <= llm.queue_low_water and in_flight <= service.max_in_flight // 2
        if not self._paused and full:
            self.source.pause()
            self._paused = True
            log.info("paused", llm_backlog=backlog, in_flight=in_flight, in_flight_bytes=self.in_flight_bytes)
        elif self._paused and drained and not self._over_bytes(0.5):
            self.source.resume()
            self._paused = False
            log.info("resumed", llm_backlog=backlog, in_flight=in_flight)

    # -- score and route -------------------------------------------------------------------------------
    async def _score_loop(self) -> None:
        """Score batch after batch, later ones already scoring while one is routed and published."""
        await self._scoring.each(self._batches, self._dispatch_batch)

    async def _dispatch_batch(self, batch: list[Scored]) -> None:
        """Route a scored batch under one tau: the small-path outputs go to the sink together, in order; an
        uncertain review first lets the small-path outputs before it go."""
        tau = self.loop.threshold()
        ready: list[tuple[Outgoing, _Completion]] = []
        for scored in batch:
            if route(scored, tau) is Route.SMALL:
                ready.append(self._small(scored))
                self.loop.on_small(scored)  # perhaps an audit, in the background: it holds no offset
                continue
            if ready:
                await self._sink.publish_all(ready)
                ready = []
            await self._dispatch_uncertain(scored)
        if ready:
            await self._sink.publish_all(ready)

    def _small(self, scored: Scored) -> tuple[Outgoing, _Completion]:
        done = _Completion(scored.review.origin, 1, self._finish_one, "small")
        done.est_tokens = self._estimate(scored.review.text)
        return self._labeled(scored, None), done

    async def _dispatch_uncertain(self, scored: Scored) -> None:
        if self._deferrer.takes(self._llm.backlog()):  # done once the deferred record is delivered
            return await self._deferrer.defer(scored, _Completion(scored.review.origin, 1, self._finish_one))
        task = asyncio.create_task(self._ask_llm(scored), name="llm-task")
        self._llm_tasks.add(task)
        task.add_done_callback(self._llm_tasks.discard)
        self.supervisor.watch_errors(task, "llm-task")

    async def _ask_llm(self, scored: Scored) -> None:
        started = time.monotonic()
        outcome = await self.loop.label(scored)  # the spend cap may answer "budget" at once
        origin = scored.review.origin
        if isinstance(outcome, LlmAnswer):
            distill = not outcome.cached
            done = _Completion(origin, 2 if distill else 1, self._finish_one, "large")
            done.answer, done.cost_usd, done.started = outcome, outcome.cost_usd, started
            done.est_tokens = self._estimate(scored.review.text)
            await self._publish_labeled(scored, outcome, done)
            if distill:
                value = contracts.dumps(outputs.distill(scored, outcome))
                distilled = Outgoing(self._s.topics.distill, scored.review.id, value, origin=origin)
                await self._sink.publish(distilled, done)  # origin: a refused record is dead-lettered
        elif on_give_up(self._s.router.fallback) == "publish_fallback":
            done = _Completion(origin, 1, self._finish_one, "fallback")
            done.cost_usd, done.est_tokens = outcome.cost_usd, self._estimate(scored.review.text)
            done.started = started
            await self._publish_labeled(scored, outcome, done)
        else:
            self._meter.on_billed(outcome.cost_usd)  # an invalid answer is billed: it counts, dead letter or not
            await self._dead_letter("llm_failed", _failure_text(outcome), origin, None, review=scored.review)

    # -- publish ---------------------------------------------------------------------------------------
    async def _publish_labeled(self, scored: Scored, outcome: LlmOutcome | None, done: _Completion) -> None:
        await self._sink.publish(self._labeled(scored, outcome), done)

    def _labeled(self, scored: Scored, outcome: LlmOutcome | None) -> Outgoing:
        message = outputs.labeled(scored, outcome, self.loop.in_force, self._s.metrics.instance_id)
        headers = (*scored.review.origin.headers, ("shunt-source", str(message["source"]).encode()))
        return Outgoing(self._s.topics.output, scored.review.id, contracts.dumps(message), headers)

    async def _dead_letter(
        self, reason: str, detail: str, origin: Origin, value: bytes | None, review: Review | None = None
    ) -> None:
        log.warning("dead_letter", reason=reason, topic=origin.topic, partition=origin.partition, offset=origin.offset)
        if review is not None:
            value = contracts.dumps({"id": review.id, "text": review.text, **review.metadata})
        message = outputs.dlq(
            reason, detail, origin, value, self._s.metrics.instance_id, review_id=review.id if review else None
        )
        done = _Completion(origin, 1, self._finish_one)
        done.dlq_reason = reason
        await self._sink.publish(
            Outgoing(self._s.topics.dlq, origin.key, contracts.dumps(message), origin.headers), done
        )

    def _finish_one(self, state: _Completion) -> None:
        origin = state.origin
        self.tracker.done((origin.topic, origin.partition), origin.offset)
        self.in_flight_bytes -= self._sizes.pop((origin.topic, origin.partition, origin.offset), 0)
        if state.dlq_reason is not None:
            self._meter.on_dlq(state.dlq_reason)
        if state.source is not None:
            latency_ms = (time.monotonic() - state.started) * 1000
            self._meter.on_labeled(state.source, state.cost_usd, state.answer, state.est_tokens, latency_ms)
        self._progress.set()

    # -- offsets and rebalances ------------------------------------------------------------------------
    async def _store_loop(self, stop: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self._s.service.commit_interval_s)  # a period, not a synchronisation
            self.source.store(self.tracker.to_store())

    async def _wait_until(self, condition: Callable[[], bool], deadline: float) -> bool:
        return await wait_until(condition, deadline - time.monotonic(), wake=self._progress)

    async def on_assign(self, tps: list[TP]) -> None:
        self.tracker.assign(tps)
        if 0 < self._partitions < len(self.tracker.owned()):
            await self._recount_partitions()  # the input topic grew while we ran
        self._reshare()
        self.assigned.set()

    async def _recount_partitions(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            count = await loop.run_in_executor(None, self.source.partition_count, self._s.topics.input)
        except Exception as exc:  # metadata is best effort here: never fail a rebalance over the LLM share
            log.warning("partition_count_failed", error=str(exc))
            count = 0
        self._partitions = max(count, len(self.tracker.owned()))
        log.info("input_partitions_changed", partitions=self._partitions)

    async def on_revoke(self, tps: list[TP]) -> dict[TP, int]:
        # Closing (the run has drained already): what is not done now will not be, so do not wait again.
        deadline = time.monotonic() + (0.0 if self._drained else self._s.service.drain_timeout_s / 2)
        finished = await self._wait_until(lambda: self.tracker.in_flight(tps) == 0, deadline)
        # Every watermark of the revoked partitions, not only those moved since the last store: a stored offset
        # may not be auto-committed yet, and the new owner starts from what is committed.
        revoked = set(tps)
        offsets = {tp: o for tp, o in self.tracker.watermarks().items() if tp in revoked}
        log.info("revoke_drained", complete=finished, abandoned=self.tracker.in_flight(tps))
        self.tracker.revoke(tps)
        self._reshare()
        return offsets

    async def on_lost(self, tps: list[TP]) -> None:
        self.tracker.revoke(tps)  # never commit for partitions that are already someone else's
        self._reshare()

    def _reshare(self) -> None:
        owned = len(self.tracker.owned())
        if self._partitions > 0:
            self._llm.set_share(min(max(owned, 1) / self._partitions, 1.0))


def _failure_text(failure: LlmFailure) -> str:
    return f"{failure.reason}: {failure.detail}" if failure.detail else failure.reason
