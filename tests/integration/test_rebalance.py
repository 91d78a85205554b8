"""Revoke commits every done watermark of the revoked partitions, including ones already stored."""

from __future__ import annotations

from typing import Any, cast

from consumer.config import Settings
from consumer.stream.pipeline import Parts, Pipeline


async def test_revoke_returns_watermarks_already_stored_but_maybe_not_committed() -> None:
    unused = cast(Any, None)  # revoke touches only the offset tracker
    pipeline = Pipeline(Settings(), Parts(sink=unused, scoring=unused, llm=unused, meter=unused, estimate=len))
    tp, other = ("reviews", 0), ("reviews", 1)
    await pipeline.on_assign([tp, other])
    for offset in range(5):
        pipeline.tracker.read(tp, offset)
        pipeline.tracker.done(tp, offset)
    pipeline.tracker.read(other, 0)
    assert pipeline.tracker.to_store() == {tp: 5, other: 0}  # the periodic store has handed these out already
    pipeline.tracker.done(other, 0)
    assert await pipeline.on_revoke([tp]) == {tp: 5}
    assert pipeline.tracker.owned() == [other]
