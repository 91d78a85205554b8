"""The probe: queues, lag and breaker read through the ``*View`` protocols, over fakes."""

from __future__ import annotations

from tests.unit.observe.fakes import FakeStats, make_probe


def test_probe_reads_queues_lag_and_keeps_the_last_lag_once_closed() -> None:
    probe, pool, pipeline = make_probe()
    pool.current = FakeStats(backlog=7, breaker_state="open", breaker_transitions=1, timeouts=2)
    pipeline.tracker.pending = 11
    pipeline.source.assigned = [("reviews", 0), ("reviews", 1)]
    pipeline.source.high = {("reviews", 0): 100, ("reviews", 1): 50}
    pipeline.tracker.marks = {("reviews", 0): 90}
    reading = probe.read()
    assert reading.queues == {"llm_backlog": 7, "in_flight": 11, "producer_queue": 0}
    assert reading.lag == {"reviews/0": 10, "reviews/1": 50}
    assert (reading.breaker_state, reading.breaker_transitions, reading.llm_timeouts) == ("open", 1, 2)
    pipeline.source.closed = True
    pipeline.source.assigned = []
    assert probe.read().lag == {"reviews/0": 10, "reviews/1": 50}
    assert probe.assignment() == []
