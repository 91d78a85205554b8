"""Pause state across rebalances (issue 14): an instance kept paused by a slow LLM loses partitions to a second
instance and gets them back when it leaves; every partition is still consumed to the end."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from consumer.errors import ExitCode
from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.service import Collector, start_service, start_standin

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]
COUNT, PARTITIONS = 800, 4


@pytest.fixture
def slow_llm(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(tmp_path / "standin.log", "--latency-ms", "100-200")
    yield url
    proc.kill()


def test_paused_revoked_and_reassigned_partitions_are_consumed_to_the_end(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, slow_llm: str
) -> None:
    rows = [r.as_dict() for r in generate(COUNT, seed=71, prefix="pause")]
    source, group = topics.make("in", partitions=PARTITIONS), kafka.unique("g")
    settings = {
        "topics__input": source, "topics__output": topics.make("out"), "topics__dlq": topics.make("dlq"),
        "topics__distill": topics.make("distill"), "topics__metrics": topics.make("metrics"),
        "kafka__group_id": group, "llm__base_url": slow_llm, "llm__rpm": 1_000_000, "llm__tpm": 1_000_000_000,
        "llm__max_concurrency": 8, "llm__queue_high_water": 20, "llm__queue_low_water": 5,
        "router__threshold": 1.0, "service__drain_timeout_s": 10,
    }  # fmt: skip
    kafka.produce_reviews(source, rows)
    first = start_service(tmp_path / "a.log", "--idle-timeout", "6", **settings)
    out = Collector(settings["topics__output"])
    second = None
    try:
        kafka.wait_for(lambda: '"event": "paused"' in first.log(), 60, "the first instance pauses")
        second = start_service(tmp_path / "b.log", **settings)
        kafka.wait_for(lambda: '"event": "partitions_revoked"' in first.log(), 60, "a rebalance takes partitions")
        out.wait_count(out.poll() + 100, 120)
        second.signal(signal.SIGTERM)
        assert second.wait(60) == ExitCode.OK, second.log()[-3000:]
        want = {r["id"] for r in rows}
        kafka.wait_for(lambda: out.poll() >= 0 and want <= set(out.ids()), 180, "every review labeled")
        assert first.wait(120) == ExitCode.OK, first.log()[-3000:]
    finally:
        out.close()
        first.kill()
        if second is not None:
            second.kill()
    committed = kafka.committed(group, source, PARTITIONS)
    assert sum(committed.values()) == COUNT, committed
    log = first.log()
    assert _paused_when_revoked(log), "the first instance was not paused when it lost partitions"
    pauses, revokes = log.count('"event": "paused"'), log.count('"event": "partitions_revoked"')
    report(f"paused instance, a second joins and leaves: {pauses} pauses and {revokes} revokes on the first, "
           f"all {COUNT} labeled, committed {sum(committed.values())} = end of the topic")  # fmt: skip


def _paused_when_revoked(log: str) -> bool:
    """Whether the last pause/resume before the first revoke was a pause."""
    state = None
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        event = orjson.loads(line).get("event")
        if event in ("paused", "resumed"):
            state = event
        elif event == "partitions_revoked":
            return state == "paused"
    return False
