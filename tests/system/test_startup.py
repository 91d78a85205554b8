"""Start-up checks and a topic that goes away (issue 14): every topic the service writes must exist before it
consumes (exit 2 naming the one missing, unless --create-topics); an output topic deleted while it runs stops it
cleanly with exit 4 and nothing committed past undelivered work; once recreated, a restart loses nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from consumer.errors import ExitCode
from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.service import Collector, start_service, start_standin

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


@pytest.fixture
def fast_llm(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(tmp_path / "standin.log", "--latency-ms", "1-5")
    yield url
    proc.kill()


def settings_for(topics: kafka.Topics, llm_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "topics__input": topics.make("in"), "topics__output": topics.make("out"), "topics__dlq": topics.make("dlq"),
        "topics__distill": topics.make("distill"), "topics__metrics": topics.make("metrics"),
        "kafka__group_id": kafka.unique("g"), "llm__base_url": llm_url, "llm__rpm": 1_000_000,
        "llm__tpm": 1_000_000_000, "router__threshold": 0.9,
    } | extra  # fmt: skip


def rows(count: int, seed: int) -> list[dict[str, Any]]:
    return [r.as_dict() for r in generate(count, seed=seed, hard_share=0.2, prefix=f"s{seed}")]


def test_a_missing_output_topic_refuses_the_start_naming_it(topics: kafka.Topics, tmp_path: Path) -> None:
    missing = kafka.unique("never-created")
    settings = settings_for(topics, "http://127.0.0.1:9/v1", topics__dlq=missing)
    started = time.monotonic()
    proc = start_service(tmp_path / "service.log", **settings)
    assert proc.wait(60) == ExitCode.REFUSED, proc.log()[-2000:]
    lines = proc.log().strip().splitlines()
    assert missing in lines[-1] and "topics.dlq" in lines[-1] and "--create-topics" in lines[-1], lines[-3:]
    assert "Traceback" not in proc.log()
    assert time.monotonic() - started < 30


def test_create_topics_creates_what_is_missing(
    topics: kafka.Topics, tmp_path: Path, fast_llm: str, kafka_admin: AdminClient
) -> None:
    out, dlq = kafka.unique("created-out"), kafka.unique("created-dlq")
    topics.created += [out, dlq]  # deleted at the end like the others
    settings = settings_for(topics, fast_llm, topics__output=out, topics__dlq=dlq, topics__create_partitions=3)
    batch = rows(40, seed=41)
    kafka.produce_reviews(settings["topics__input"], batch)
    proc = start_service(tmp_path / "service.log", "--create-topics", "--max-messages", "40", **settings)
    assert proc.wait(120) == ExitCode.OK, proc.log()[-3000:]
    assert len(kafka_admin.list_topics(out, timeout=10).topics[out].partitions) == 3
    assert {r["id"] for r in kafka.read_json(out, 40)} == {r["id"] for r in batch}


def test_output_deleted_while_running_stops_fatal_and_a_restart_loses_nothing(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, fast_llm: str, kafka_admin: AdminClient
) -> None:
    settings = settings_for(topics, fast_llm, service__drain_timeout_s=5)
    source, output, group = settings["topics__input"], settings["topics__output"], settings["kafka__group_id"]
    first, second = rows(200, seed=42), rows(200, seed=43)
    kafka.produce_reviews(source, first)
    proc = start_service(tmp_path / "first.log", **settings)
    out = Collector(output)
    try:
        out.wait_count(len(first), 120)
        kafka.wait_for(lambda: kafka.committed(group, source, 1)[0] == len(first), 30, "the first 200 committed")
    finally:
        out.close()
    kafka_admin.delete_topics([output])[output].result(timeout=30)
    kafka.wait_for(lambda: output not in kafka_admin.list_topics(timeout=5).topics, 30, "the output topic is gone")
    kafka.produce_reviews(source, second)
    deleted = time.monotonic()
    code = proc.wait(180)
    stopped_s = time.monotonic() - deleted
    log = proc.log()
    assert code == ExitCode.FATAL, log[-3000:]
    assert log.count('"event": "fatal"') == 1, log[-3000:]
    assert output in log.strip().splitlines()[-1]
    committed = kafka.committed(group, source, 1)[0]
    assert committed == len(first), f"committed {committed}: past work whose output was never delivered"
    kafka_admin.create_topics([NewTopic(output, num_partitions=1, replication_factor=1)])[output].result(30)
    restart = start_service(tmp_path / "second.log", "--idle-timeout", "5", **settings)
    assert restart.wait(180) == ExitCode.OK, restart.log()[-3000:]
    again = kafka.read_json(output, len(second))
    assert {r["id"] for r in second} <= {r["id"] for r in again}
    report(
        f"output topic deleted mid-run: exit {code} {stopped_s:.1f} s after the next reviews arrived, committed "
        f"{committed} (= delivered), restart after recreating it: {len(second)} of {len(second)} labeled"
    )
