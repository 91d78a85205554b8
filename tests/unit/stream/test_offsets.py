"""The offset tracker: out-of-order completion, in-order watermarks that never go backwards."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from consumer.stream.offsets import OffsetTracker

TP = ("reviews", 0)


def test_watermark_waits_for_the_earliest_unfinished_offset() -> None:
    tracker = OffsetTracker()
    tracker.assign([TP])
    for offset in range(5):
        assert tracker.read(TP, offset)
    tracker.done(TP, 3)
    tracker.done(TP, 1)
    assert tracker.to_store() == {TP: 0}
    tracker.done(TP, 0)
    assert tracker.to_store() == {TP: 2}
    tracker.done(TP, 2)
    tracker.done(TP, 4)
    assert tracker.to_store() == {TP: 5}
    assert tracker.to_store() == {}
    assert tracker.in_flight() == 0


def test_gaps_in_offsets_are_not_waited_for() -> None:
    tracker = OffsetTracker()
    tracker.assign([TP])
    for offset in (10, 12, 15):
        tracker.read(TP, offset)
    for offset in (15, 10, 12):
        tracker.done(TP, offset)
    assert tracker.to_store() == {TP: 16}


def test_revoked_partition_ignores_late_completions_and_rereads_are_refused() -> None:
    tracker = OffsetTracker()
    tracker.assign([TP])
    tracker.read(TP, 0)
    assert not tracker.read(TP, 0)
    tracker.revoke([TP])
    tracker.done(TP, 0)
    assert tracker.to_store() == {}
    assert not tracker.read(TP, 1)


@given(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=200), st.randoms())
def test_committed_never_passes_an_unfinished_message(gaps: list[int], rnd: random.Random) -> None:
    tracker = OffsetTracker()
    tracker.assign([TP])
    offsets, offset = [], 0
    for gap in gaps:
        offset += gap
        tracker.read(TP, offset)
        offsets.append(offset)
    order = offsets[:]
    rnd.shuffle(order)
    finished: set[int] = set()
    last = -1
    for offset in order:
        tracker.done(TP, offset)
        finished.add(offset)
        mark = tracker.to_store().get(TP, last)
        assert mark >= last
        assert all(o in finished for o in offsets if o < mark)
        last = mark
    assert last == offsets[-1] + 1
