"""SIGTERM always ends the process within drain_timeout_s + 5 s (issue 14), whatever it is doing: here with every
LLM request hanging, in a streaming run and in a batch run (--max-messages) that is waiting for its LLM work."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumer.errors import ExitCode
from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.service import start_service, start_standin, stats

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
DRAIN_S = 3


@pytest.fixture
def hung_llm(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(tmp_path / "standin.log", "--latency-ms", "120000-120000")
    yield url
    proc.kill()


@pytest.mark.parametrize("mode", ["streaming", "batch"])
def test_sigterm_ends_the_process_within_the_drain_deadline(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, hung_llm: str, mode: str
) -> None:
    source, group = topics.make("in", partitions=2), kafka.unique("g")
    rows = [r.as_dict() for r in generate(100, seed=61, prefix="term")]
    kafka.produce_reviews(source, rows)
    args = ["--max-messages", "100"] if mode == "batch" else []
    proc = start_service(
        tmp_path / "service.log", *args,
        topics__input=source, topics__output=topics.make("out"), topics__dlq=topics.make("dlq"),
        topics__distill=topics.make("distill"), topics__metrics=topics.make("metrics"), kafka__group_id=group,
        llm__base_url=hung_llm, llm__read_timeout_s=600, router__threshold=1.0,
        service__drain_timeout_s=DRAIN_S,
    )  # fmt: skip
    try:
        kafka.wait_for(lambda: stats(hung_llm)["requests"] >= 16, 60, "LLM requests hanging")
        if mode == "batch":
            kafka.wait_for(lambda: "max_messages_reached" in proc.log(), 60, "the batch stop waits for its work")
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.wait(DRAIN_S + 30)
        seconds = time.monotonic() - sent
    finally:
        proc.kill()
    assert code == ExitCode.OK, proc.log()[-3000:]
    assert seconds < DRAIN_S + 5, f"{seconds:.1f} s"
    assert "unfinished: " in proc.log().strip().splitlines()[-1]
    assert all(offset <= 0 for offset in kafka.committed(group, source, 2).values())  # nothing done: none committed
    report(f"SIGTERM with every LLM request hanging ({mode}): exit {code} after {seconds:.1f} s (drain {DRAIN_S} s)")
