"""ScoringStage.each: batches handled in order while the next ones already score; an error in scoring or in
the handler ends it with no task left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from consumer.records import Prediction, Review, Scored
from consumer.small.scoring import ScoringStage
from tests.unit.small.test_workers import _until, reviews


class Recorder:
    """Replicable; records the first text of every batch it starts; fails on a text saying so."""

    def __init__(self, started: list[str]) -> None:
        self.version, self.labels = "r", ("negative", "positive")
        self.started = started

    def replica(self) -> Recorder:
        return Recorder(self.started)

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        self.started.append(texts[0])
        if texts[0] == "fail":
            raise RuntimeError("the model broke")
        return [Prediction("positive", 0.9, {"negative": 0.1, "positive": 0.9}, self.version) for _ in texts]


def queued(*texts: str) -> asyncio.Queue[list[Review] | None]:
    batches: asyncio.Queue[list[Review] | None] = asyncio.Queue()
    for index, text in enumerate(texts):
        batches.put_nowait(reviews([text], index))
    batches.put_nowait(None)
    return batches


async def test_batches_are_handled_in_order_while_the_next_two_already_score() -> None:
    started: list[str] = []
    stage = ScoringStage(Recorder(started), workers=2)
    handled: list[str] = []

    async def handle(batch: list[Scored]) -> None:
        if not handled:  # the first batch waits until the two after it have started scoring
            await asyncio.to_thread(_until, lambda: len(started) >= 3)
        handled.append(batch[0].review.text)

    try:
        await asyncio.wait_for(stage.each(queued("a", "b", "c", "d", "e"), handle), 20)
    finally:
        stage.close()
    assert handled == ["a", "b", "c", "d", "e"] and sorted(started) == handled


@pytest.mark.parametrize("where", ["scoring", "handler"])
async def test_an_error_ends_it_and_leaves_no_task_running(where: str) -> None:
    stage = ScoringStage(Recorder([]), workers=2)
    before = asyncio.all_tasks()

    async def handle(batch: list[Scored]) -> None:
        if where == "handler" and batch[0].review.text == "b":
            raise RuntimeError("the sink broke")

    texts = ("a", "fail", "c") if where == "scoring" else ("a", "b", "c", "d")
    try:
        with pytest.raises(RuntimeError, match="broke"):
            await asyncio.wait_for(stage.each(queued(*texts), handle), 20)
    finally:
        stage.close()
    assert asyncio.all_tasks() - before == set()


async def test_a_cancel_while_handling_cancels_what_is_scoring_ahead() -> None:
    stage = ScoringStage(Recorder([]), workers=1)
    before = asyncio.all_tasks()
    blocked = asyncio.Event()

    async def handle(batch: list[Scored]) -> None:
        blocked.set()
        await asyncio.Event().wait()  # never returns: the caller cancels

    batches: asyncio.Queue[list[Review] | None] = asyncio.Queue()
    for index in range(4):
        batches.put_nowait(reviews([str(index)], index))
    running = asyncio.create_task(stage.each(batches, handle))
    await asyncio.wait_for(blocked.wait(), 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    stage.close()
    assert asyncio.all_tasks() - before == set()
