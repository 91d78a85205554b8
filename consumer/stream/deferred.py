"""The batch stage: deferred reviews in, one provider batch per run of offsets, labels out, offsets committed last.

It consumes ``topics.deferred`` with a consumer group of its own (``batch.group_id``) and collects each
partition's reviews until ``batch.max_requests`` or ``batch.max_wait_s``. A chunk is then uploaded as JSONL,
created as a batch whose metadata key names the offsets it covers (``shunt:{topic}:{partition}:{first}-{last}``,
deterministic) and polled every ``batch.poll_interval_s``; its output and error files are read, every review
is published (:mod:`consumer.stream.batchout`) and only then is its deferred offset done.

Crash safety without paying twice: before reading a newly assigned partition the stage lists the batches it
created (``GET /batches``, by the group in their metadata). A record whose offset falls in such a batch's
range joins that batch instead of a new one, and the batch is polled again once all of its records are read
back. One batch never spans two partitions, and offsets are committed in order, so a batch is either wholly
committed or wholly read again. A create that failed in transit is looked up by its key before it is retried.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from consumer.aio import cancel_and_wait
from consumer.config import Settings
from consumer.errors import BadInputError, LlmError, PermanentLlmError
from consumer.kafka.message import Message
from consumer.kafka.sink import KafkaSink
from consumer.kafka.source import KafkaSource
from consumer.llm.batch import GROUP_FIELD, KEY_FIELD, BatchApi, BatchInfo, ItemResult, parse_results, request_file
from consumer.llm.cache import CacheKey, cache_key
from consumer.llm.client import LlmClient
from consumer.llm.prompting import Prompt, build_prompt
from consumer.observe.meter import Meter
from consumer.records import TopicPartition as TP
from consumer.stream.batchout import BatchPublisher, OnlineLabeler, batch_answer, billed, shared_answer
from consumer.stream.deferral import Deferred, batch_key, parse_key, read_deferred
from consumer.stream.offsets import OffsetTracker

log = structlog.get_logger(__name__)
T = TypeVar("T")
_POLL_MAX = 500
_IDLE_S = 2.0  # a finishing stage is drained once nothing new arrived for this long
_BACKOFF_MAX_S = 30.0


@dataclass(eq=False)
class Chunk:
    """The reviews of one batch: collecting (``info`` None), or a batch found after a restart."""

    tp: TP
    items: list[Deferred] = field(default_factory=list)
    opened: float = field(default_factory=time.monotonic)
    info: BatchInfo | None = None
    first: int = -1
    last: int = -1
    started: bool = False

    @property
    def key(self) -> str:
        if self.info is not None:
            return self.info.metadata[KEY_FIELD]
        return batch_key(self.tp, self.items[0].position.offset, self.items[-1].position.offset)


class BatchStage:
    """Runs until ``stop`` (abandon what is in flight: found again after a restart) or, once ``finishing``
    is set, until every deferred review read so far is published and committed."""

    def __init__(
        self, settings: Settings, sink: KafkaSink, meter: Meter, api: BatchApi, online: OnlineLabeler | None
    ) -> None:
        self._s, self._api = settings, api
        self.group = settings.batch.group(settings.kafka.group_id)
        kafka = settings.kafka.model_copy(update={"group_id": self.group})
        self.source = KafkaSource(kafka, [settings.topics.deferred], self, settings.service.drain_timeout_s)
        self.tracker = OffsetTracker()
        self.out = BatchPublisher(settings, sink, meter, self.tracker, online)
        self._client = LlmClient(settings.llm)  # builds the request bodies; sends nothing
        self._price, self._factor = settings.llm.price(), settings.batch.price_factor
        self._collecting: dict[TP, Chunk] = {}
        self._known: dict[TP, list[Chunk]] = {}
        self._tasks: dict[asyncio.Task[None], Chunk] = {}
        self._relist: set[TP] = set()
        self.last_message = time.monotonic()
        self._paused = False
        self.finishing = asyncio.Event()
        self.batches_created = 0
        self.batches_resumed = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.source.start()
        storer = asyncio.create_task(self._store_loop(), name="batch-offset-store")
        try:
            await self._loop(stop)
        finally:
            await cancel_and_wait([*self._tasks, storer])
            self.source.store(self.tracker.to_store())
            await self.source.commit(self.tracker.watermarks())
            await self.source.close()
            log.info("batch_stage_stopped", published=self.out.published, abandoned=self.tracker.in_flight())

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._seal_due()
            if self._drained():
                return
            self._apply_backpressure()
            messages = await self.source.poll(_POLL_MAX, self._wait_s())
            if self._relist:
                await self._list_known(stop)
            self._accept(messages)

    async def _store_loop(self) -> None:
        while True:
            await asyncio.sleep(self._s.service.commit_interval_s)  # a period, not a synchronisation
            self.source.store(self.tracker.to_store())

    def _drained(self) -> bool:
        if not self.finishing.is_set() or self._collecting or self.tracker.in_flight() or self._relist:
            return False
        assigned, marks = self.source.assignment(), self.tracker.watermarks()
        lag = self.source.lag(marks)
        quiet = time.monotonic() - self.last_message >= _IDLE_S
        # A partition nothing was read from this run has no watermark here (its committed offset is not known
        # to us): quiet is the best sign it is at its end. What is left there waits for the next run.
        return bool(assigned) and quiet and not any(lag.get(tp, 0) for tp in assigned if tp in marks)

    def _wait_s(self) -> float:
        if not self._collecting:
            return 0.5
        due = min(c.opened for c in self._collecting.values()) + self._s.batch.max_wait_s
        return min(0.5, max(0.01, due - time.monotonic()))

    def _apply_backpressure(self) -> None:
        in_flight, limit = self.tracker.in_flight(), self._s.service.max_in_flight
        if not self._paused and in_flight >= limit:
            self.source.pause()
            self._paused = True
        elif self._paused and in_flight <= limit // 2:
            self.source.resume()
            self._paused = False

    # -- collecting ------------------------------------------------------------------------------------
    def _accept(self, messages: list[Message]) -> None:
        for message in messages:
            tp, offset = (message.topic() or "", message.partition() or 0), message.offset() or 0
            if not self.tracker.read(tp, offset):
                continue
            self.last_message = time.monotonic()
            try:
                item = read_deferred(message)
            except BadInputError as exc:
                log.warning("deferred_skipped", reason=exc.reason, topic=tp[0], partition=tp[1], offset=offset)
                self.tracker.done(tp, offset)
                self._check_known(tp, offset)
                continue
            self._take(tp, offset, item)

    def _take(self, tp: TP, offset: int, item: Deferred) -> None:
        known = self._known_for(tp, offset)
        if known is not None:
            self._seal(tp)  # a new chunk never reaches into a batch that already exists
            known.items.append(item)
            self._check_known(tp, offset)
            return
        chunk = self._collecting.setdefault(tp, Chunk(tp))
        chunk.items.append(item)
        if len(chunk.items) >= self._s.batch.max_requests:
            self._seal(tp)

    def _known_for(self, tp: TP, offset: int) -> Chunk | None:
        return next((c for c in self._known.get(tp, []) if c.first <= offset <= c.last and not c.started), None)

    def _check_known(self, tp: TP, offset: int) -> None:
        """Resume a batch found after a restart once the last record of its range is read back."""
        known = self._known_for(tp, offset)
        if known is not None and offset >= known.last:
            known.started = True
            self.batches_resumed += 1
            assert known.info is not None
            log.info("batch_resumed", key=known.key, batch=known.info.id, status=known.info.status)
            self._start(known)

    def _seal_due(self) -> None:
        now = time.monotonic()
        for tp, chunk in list(self._collecting.items()):
            if self.finishing.is_set() or now - chunk.opened >= self._s.batch.max_wait_s:
                self._seal(tp)

    def _seal(self, tp: TP) -> None:
        chunk = self._collecting.pop(tp, None)
        if chunk is not None and chunk.items:
            chunk.started = True
            self._start(chunk)

    def _start(self, chunk: Chunk) -> None:
        task = asyncio.create_task(self._lifecycle(chunk), name="batch")
        self._tasks[task] = chunk
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        chunk = self._tasks.pop(task, None)
        if chunk is not None and chunk in self._known.get(chunk.tp, []):
            self._known[chunk.tp].remove(chunk)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch_task_failed", error=repr(task.exception()))

    # -- one batch, from upload to published -----------------------------------------------------------
    async def _lifecycle(self, chunk: Chunk) -> None:
        prompts, owners = self._requests(chunk.items)
        info = chunk.info
        try:
            if info is None:
                info = await self._submit(chunk, prompts)
            info = await self._poll(info)
            results = await self._results(info, prompts)
        except PermanentLlmError as exc:
            log.error("batch_refused", key=chunk.key, error=str(exc))
            info, results = None, {}
        await self._publish(chunk, info, results, prompts, owners)

    def _requests(self, items: list[Deferred]) -> tuple[dict[str, Prompt], dict[str, str]]:
        """One request per distinct prompt, as the online cache would have it: the requests by custom_id, and
        for each item the custom_id whose answer it takes (the same after a restart: items come in order)."""
        requests: dict[str, Prompt] = {}
        first: dict[CacheKey, str] = {}
        owners: dict[str, str] = {}
        for item in items:
            prompt = self._prompt(item)
            key = cache_key(item.scored.review.text, prompt.version, self._s.llm.model, prompt.allowed_labels)
            owner = owners[item.custom_id] = first.setdefault(key, item.custom_id)
            if owner == item.custom_id:
                requests[owner] = prompt
        return requests, owners

    def _prompt(self, item: Deferred) -> Prompt:
        llm = self._s.llm  # the online pool's S4L prompt, built the same way
        text, probs = item.scored.review.text, item.scored.prediction.probs
        return build_prompt(text, probs, "s4l", prompt_mass=llm.prompt_mass, hint=llm.hint)

    async def _submit(self, chunk: Chunk, prompts: dict[str, Prompt]) -> BatchInfo:
        key = chunk.key
        content = request_file(self._client, list(prompts.items()))
        file_id = await self._retrying(lambda: self._api.upload(content, key.replace(":", "_") + ".jsonl"))
        metadata = {KEY_FIELD: key, GROUP_FIELD: self.group}
        tries = 0

        async def create() -> BatchInfo:
            nonlocal tries
            tries += 1
            if tries > 1:  # the last create may have reached the provider before it failed
                found = await self._api.find(metadata)
                if found:
                    return found[0]
            return await self._api.create(file_id, metadata)

        info = await self._retrying(create)
        self.batches_created += 1
        log.info("batch_created", key=key, batch=info.id, requests=len(prompts))
        return info

    async def _poll(self, info: BatchInfo) -> BatchInfo:
        batch_id = info.id
        while not info.terminal:
            await asyncio.sleep(self._s.batch.poll_interval_s)  # the provider's pace: polling is the API
            info = await self._retrying(lambda: self._api.get(batch_id))
        log.info("batch_ended", batch=info.id, status=info.status, completed=info.completed, failed=info.failed)
        return info

    async def _results(self, info: BatchInfo, prompts: dict[str, Prompt]) -> dict[str, ItemResult]:
        allowed = {custom_id: prompt.allowed_labels for custom_id, prompt in prompts.items()}
        results: dict[str, ItemResult] = {}
        for file_id in (info.error_file_id, info.output_file_id):  # an answer wins over an error line
            if file_id is not None:
                raw = await self._retrying(functools.partial(self._api.content, file_id))
                results |= parse_results(raw, allowed)
        return results

    async def _publish(
        self,
        chunk: Chunk,
        info: BatchInfo | None,
        results: dict[str, ItemResult],
        prompts: dict[str, Prompt],
        owners: dict[str, str],
    ) -> None:
        failed: list[Awaitable[None]] = []
        model = self._s.llm.model
        for item in chunk.items:
            owner = owners[item.custom_id]
            result, shared = results.get(owner), owner != item.custom_id  # shared: paid for by its owner
            if result is not None and result.label is not None:
                answer = batch_answer(result, prompts[owner], model, self._price, self._factor)
                await self.out.answered(item, shared_answer(answer) if shared else answer, "batch")
                continue
            reason = result.error if result is not None and result.error else _missing(info)
            cost = 0.0 if shared else billed(result, self._price, self._factor)
            failed.append(self.out.failed(item, reason, cost))
        if failed:
            log.info("batch_items_failed", key=chunk.key, count=len(failed), to=self._s.batch.on_item_failure)
            await asyncio.gather(*failed)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry transient provider errors with capped, jittered backoff; permanent ones raise."""
        attempt = 0
        while True:
            try:
                return await call()
            except PermanentLlmError:
                raise
            except LlmError as exc:
                attempt += 1
                wait = random.uniform(0.5, 1.0) * min(_BACKOFF_MAX_S, self._s.batch.poll_interval_s * 2**attempt)
                log.warning("batch_api_retry", error=str(exc), attempt=attempt, wait_s=round(wait, 2))
                await asyncio.sleep(wait)  # backoff before trying the provider again

    # -- finding what we created before, and rebalances ------------------------------------------------
    async def _list_known(self, stop: asyncio.Event) -> None:
        """Read our batches for the newly assigned partitions; no record of theirs is taken before this."""
        attempt = 0
        while self._relist and not stop.is_set():
            try:
                found = await self._api.find({GROUP_FIELD: self.group})
            except LlmError as exc:
                attempt += 1
                log.warning("batch_list_failed", error=str(exc), attempt=attempt)
                await asyncio.sleep(min(_BACKOFF_MAX_S, 0.5 * 2**attempt))  # backoff, then list again
                continue
            self._remember(found)

    def _remember(self, found: list[BatchInfo]) -> None:
        for info in found:
            parsed = parse_key(info.metadata.get(KEY_FIELD, ""))
            if parsed is None or parsed[0] not in self._relist:
                continue
            tp, first, last = parsed
            known = self._known.setdefault(tp, [])
            if all(c.info is None or c.info.id != info.id for c in known):
                known.append(Chunk(tp, info=info, first=first, last=last))
        log.info("batches_found", partitions=len(self._relist), batches=sum(len(v) for v in self._known.values()))
        self._relist.clear()

    async def on_assign(self, tps: list[TP]) -> None:
        self.tracker.assign(tps)
        self._relist.update(tps)

    async def on_revoke(self, tps: list[TP]) -> dict[TP, int]:
        offsets = {tp: o for tp, o in self.tracker.watermarks().items() if tp in set(tps)}
        await self._forget(tps)
        return offsets

    async def on_lost(self, tps: list[TP]) -> None:
        await self._forget(tps)

    async def _forget(self, tps: list[TP]) -> None:
        """Batches in flight for these partitions are abandoned here; their next owner finds them."""
        gone = set(tps)
        await cancel_and_wait([task for task, chunk in self._tasks.items() if chunk.tp in gone])
        for tp in gone:
            self._collecting.pop(tp, None)
            self._known.pop(tp, None)
            self._relist.discard(tp)
        self.tracker.revoke(tps)


def _missing(info: BatchInfo | None) -> str:
    """Why an item has no line at all: its batch was refused, or ended without answering it."""
    return "rejected" if info is None else info.status
