"""Batch mode finishes its work (issue 14): a stop by --max-messages waits for the LLM work of every message it
read, however long the rate limit makes that; with --drain-timeout it may give up, and then says so (exit 3)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.errors import ExitCode
from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.service import elapsed_since, start_service, start_standin

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]
COUNT = 90


@pytest.fixture
def llm(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(tmp_path / "standin.log", "--latency-ms", "20-60")
    yield url
    proc.kill()


def batch_settings(topics: kafka.Topics, llm_url: str) -> dict[str, Any]:
    # Every review goes to the LLM, at 240 requests a minute: ~20 s of LLM work, ten times the drain deadline.
    return {
        "topics__input": topics.make("in", partitions=2), "topics__output": topics.make("out"),
        "topics__dlq": topics.make("dlq"), "topics__distill": topics.make("distill"),
        "topics__metrics": topics.make("metrics"), "kafka__group_id": kafka.unique("g"), "llm__base_url": llm_url,
        "llm__rpm": 240, "llm__cache_size": 0, "router__threshold": 1.0, "service__drain_timeout_s": 2,
    }  # fmt: skip


def produce(topic: str, seed: int) -> list[dict[str, Any]]:
    rows = [r.as_dict() for r in generate(COUNT, seed=seed, hard_share=0.3, prefix=f"b{seed}")]
    kafka.produce(topic, [orjson.dumps(r) for r in rows])
    return rows


def test_max_messages_waits_for_every_llm_answer(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, llm: str
) -> None:
    settings = batch_settings(topics, llm)
    rows = produce(settings["topics__input"], seed=31)
    started = time.monotonic()
    proc = start_service(tmp_path / "service.log", "--max-messages", str(COUNT), **settings)
    code = proc.wait(240)
    seconds = elapsed_since(started)
    assert code == ExitCode.OK, proc.log()[-3000:]
    labeled = kafka.read_json(settings["topics__output"], COUNT)
    assert {r["id"] for r in labeled} == {r["id"] for r in rows}
    assert all(r["source"] == "large" for r in labeled)  # answered, not abandoned to the fallback
    committed = kafka.committed(settings["kafka__group_id"], settings["topics__input"], 2)
    assert sum(committed.values()) == COUNT
    report(f"--max-messages {COUNT} at 240 RPM (drain_timeout_s 2): all {COUNT} labeled, exit 0, {seconds:.1f} s")


def test_drain_timeout_gives_up_with_exit_3_and_the_count(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, llm: str
) -> None:
    settings = batch_settings(topics, llm)
    produce(settings["topics__input"], seed=32)
    proc = start_service(tmp_path / "service.log", "--max-messages", str(COUNT), "--drain-timeout", "1", **settings)
    code = proc.wait(120)
    log = proc.log().strip().splitlines()
    assert code == ExitCode.UNFINISHED, "\n".join(log[-30:])
    last = log[-1]
    assert last.startswith("unfinished: ") and last.endswith("messages will be read again by the next run"), last
    left = int(last.split()[1])
    committed = kafka.committed(settings["kafka__group_id"], settings["topics__input"], 2)
    assert 0 < left <= COUNT
    assert sum(max(o, 0) for o in committed.values()) == COUNT - left, (committed, left)
    report(f"--max-messages {COUNT} --drain-timeout 1 at 240 RPM: exit 3, '{last}'")
