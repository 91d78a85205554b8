"""What the batch stage writes for each deferred review, and when its deferred offset is done.

An answer from a batch becomes a labeled message (``lane`` = batch, the batch price) and a distill record.
An item that expired or failed, or whose whole batch did, goes to the online pool (``batch.on_item_failure``
= online; its answer says ``lane`` = online) or straight to the router's fallback (the small label flagged,
or a dead letter). Either way the deferred offset is done only once every message for it is delivered.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Literal, Protocol

import structlog

from consumer import contracts
from consumer.config import PriceConfig, Settings
from consumer.kafka.sink import KafkaSink, Outgoing
from consumer.llm.batch import ItemResult
from consumer.llm.prompting import Prompt, estimate_prompt_tokens
from consumer.observe.meter import Meter
from consumer.records import LlmAnswer, LlmFailure, LlmOutcome, Scored, Source
from consumer.stream import outputs
from consumer.stream.deferral import Deferred
from consumer.stream.offsets import OffsetTracker
from consumer.stream.routing import on_give_up

log = structlog.get_logger(__name__)
Lane = Literal["online", "batch"]


class OnlineLabeler(Protocol):
    """The online pool, for items the batch lane could not answer."""

    async def label(self, scored: Scored, prompt: Literal["s4l", "plain"] = "s4l") -> LlmOutcome: ...


class _Done:
    """Counts the deliveries one deferred review still waits for; the last one marks its offset done."""

    __slots__ = ("answer", "cost_usd", "dlq_reason", "finish", "item", "lane", "remaining", "source")

    def __init__(self, item: Deferred, remaining: int, finish: Callable[[_Done], None]) -> None:
        self.item, self.remaining, self.finish = item, remaining, finish
        self.source: Source | None = None
        self.lane: Lane = "batch"
        self.answer: LlmAnswer | None = None
        self.cost_usd = 0.0
        self.dlq_reason: str | None = None

    def __call__(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.finish(self)


def batch_answer(result: ItemResult, prompt: Prompt, model: str, price: PriceConfig, factor: float) -> LlmAnswer:
    """A batch item's answer at the batch price (``factor`` of the online price)."""
    assert result.label is not None and result.usage is not None
    usage = result.usage
    cost = (usage.prompt_tokens * price.input_per_mtok + usage.completion_tokens * price.output_per_mtok) / 1e6
    return LlmAnswer(
        label=result.label, model=model, prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens, cost_usd=cost * factor, latency_ms=0.0,
        prompt_version=prompt.version,
    )  # fmt: skip


def shared_answer(answer: LlmAnswer) -> LlmAnswer:
    """The answer of an identical review in the same batch: the same label, paid for once (by that one)."""
    return dataclasses.replace(answer, prompt_tokens=0, completion_tokens=0, cost_usd=0.0, cached=True)


def billed(result: ItemResult | None, price: PriceConfig, factor: float) -> float:
    """What a failed item still cost (an answer outside the labels is paid for)."""
    if result is None or result.usage is None:
        return 0.0
    usage = result.usage
    return (usage.prompt_tokens * price.input_per_mtok + usage.completion_tokens * price.output_per_mtok) / 1e6 * factor


class BatchPublisher:
    """Publishes the outcome of each deferred review and marks its deferred offset done in ``tracker``."""

    def __init__(
        self, settings: Settings, sink: KafkaSink, meter: Meter, tracker: OffsetTracker, online: OnlineLabeler | None
    ) -> None:
        self._s, self._sink, self._meter, self._tracker, self._online = settings, sink, meter, tracker, online
        self.published: dict[str, int] = {"batch": 0, "online": 0, "fallback": 0, "dlq": 0}

    async def answered(self, item: Deferred, answer: LlmAnswer, lane: Lane) -> None:
        distill = not answer.cached
        done = _Done(item, 2 if distill else 1, self._finish)
        done.source, done.lane, done.answer, done.cost_usd = "large", lane, answer, answer.cost_usd
        await self._labeled(item.scored, answer, done)
        if distill:
            value = contracts.dumps(outputs.distill(item.scored, answer))
            distilled = Outgoing(self._s.topics.distill, item.scored.review.id, value, origin=item.scored.review.origin)
            await self._sink.publish(distilled, done)

    async def failed(self, item: Deferred, reason: str, cost_usd: float) -> None:
        """The batch lane gave no usable answer: the online pool, or the fallback, per config."""
        if self._s.batch.on_item_failure == "online" and self._online is not None:
            outcome = await self._online.label(item.scored)
            if isinstance(outcome, LlmAnswer):
                await self.answered(item, outcome, "online")
                return
            failure = LlmFailure(outcome.reason, outcome.detail, outcome.attempts, outcome.cost_usd + cost_usd)
            await self._give_up(item, failure, "online")
            return
        await self._give_up(item, LlmFailure(f"batch_{reason}", cost_usd=cost_usd), "batch")

    async def _give_up(self, item: Deferred, failure: LlmFailure, lane: Lane) -> None:
        if on_give_up(self._s.router.fallback) == "publish_fallback":
            done = _Done(item, 1, self._finish)
            done.source, done.lane, done.cost_usd = "fallback", lane, failure.cost_usd
            await self._labeled(item.scored, failure, done)
            return
        review = item.scored.review
        value = contracts.dumps({"id": review.id, "text": review.text, **review.metadata})
        letter = outputs.dlq(
            "llm_failed", f"{failure.reason}: {failure.detail}", review.origin, value,
            self._s.metrics.instance_id, review_id=review.id,
        )  # fmt: skip
        done = _Done(item, 1, self._finish)
        done.dlq_reason = "llm_failed"
        out = Outgoing(self._s.topics.dlq, review.origin.key, contracts.dumps(letter), review.origin.headers)
        await self._sink.publish(out, done)

    async def _labeled(self, scored: Scored, outcome: LlmOutcome, done: _Done) -> None:
        message = outputs.labeled(scored, outcome, self._s.router.threshold, self._s.metrics.instance_id)
        message["lane"] = done.lane
        headers = (*scored.review.origin.headers, ("shunt-source", str(message["source"]).encode()))
        out = Outgoing(self._s.topics.output, scored.review.id, contracts.dumps(message), headers, scored.review.origin)
        await self._sink.publish(out, done)

    def _finish(self, done: _Done) -> None:
        position = done.item.position
        self._tracker.done((position.topic, position.partition), position.offset)
        if done.dlq_reason is not None:
            self._meter.on_dlq(done.dlq_reason)
            self.published["dlq"] += 1
            return
        assert done.source is not None
        self.published["fallback" if done.source == "fallback" else done.lane] += 1
        waited_ms = _waited_ms(done.item)
        estimate = estimate_prompt_tokens(done.item.scored.review.text)
        self._meter.on_labeled(done.source, done.cost_usd, done.answer, estimate, waited_ms)
        self._meter.on_lane(done.lane, done.cost_usd)


def _waited_ms(item: Deferred) -> float:
    """From the input message's timestamp (else the deferred record's) to now, the review's whole wait."""
    stamp = item.scored.review.origin.timestamp_ms or item.position.timestamp_ms
    return max(0.0, time.time() * 1000 - stamp) if stamp else 0.0
