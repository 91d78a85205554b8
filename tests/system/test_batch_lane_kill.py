"""kill -9 of ``shunt run`` three times during the batch lifecycle (issue 16): before the upload, right after the
batch is created, and while it is polled. Nothing is lost, and the stand-in saw each deferred review in at
most one batch: after each restart the service found the batch it had created instead of paying twice."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.service import Process, control, start_service, start_standin, stats

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(240)]

COUNT = 3_000


def wait(condition: Callable[[], bool], proc: Process, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.proc.poll() is None, proc.log()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.05)  # polling the stand-in's counters and the service's log, with a deadline


def test_kill_9_before_upload_after_create_and_while_polling_loses_nothing_and_pays_once(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path
) -> None:
    standin_proc, url = start_standin(tmp_path / "standin.log", "--rpm", "1000000", "--tpm", "1000000000")
    control(url, batch_turnaround_s=8.0)
    rows = [r.as_dict() for r in generate(COUNT, seed=23, hard_share=0.3, prefix="k")]
    settings: dict[str, Any] = {
        "topics__input": topics.make("in", partitions=2), "topics__output": topics.make("out"),
        "topics__dlq": topics.make("dlq"), "topics__distill": topics.make("distill"),
        "topics__metrics": topics.make("metrics"), "topics__deferred": topics.make("deferred", partitions=2),
        "kafka__group_id": kafka.unique("g"), "llm__base_url": url, "llm__lane": "batch",
        "router__threshold": 0.97, "batch__max_requests": 10_000, "batch__poll_interval_s": 0.3,
        "service__commit_interval_s": 0.2, "audit__rate": 0,
        "kafka__consumer": '{"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}',
    }  # fmt: skip
    kafka.produce_reviews(settings["topics__input"], rows)
    group = settings["kafka__group_id"]
    try:
        # 1. Before the upload: the input is committed, the deferred reviews wait in their collecting window.
        proc = start_service(tmp_path / "run1.log", batch__max_wait_s=600, **settings)
        wait(lambda: sum(kafka.committed(group, settings["topics__input"], 2).values()) >= COUNT, proc, "input")
        assert stats(url)["files_uploaded"] == 0
        proc.kill()
        report("kill -9 #1 before the upload: the input committed to its end, 0 files uploaded")
        # 2. Right after a batch is created.
        proc = start_service(tmp_path / "run2.log", batch__max_wait_s=1, **settings)
        wait(lambda: stats(url)["batches_created"] >= 1, proc, "a batch created")
        proc.kill()
        report(f"kill -9 #2 right after create: {stats(url)['batches_created']} batches created")
        # 3. While polling: the restarted service found its batches again and polls them.
        proc = start_service(tmp_path / "run3.log", batch__max_wait_s=1, **settings)
        wait(lambda: "batch_resumed" in proc.log(), proc, "a batch found again and polled")
        assert stats(url)["batches_completed"] == 0
        proc.kill()
        created = stats(url)["batches_created"]
        report(f"kill -9 #3 while polling: {created} batches created, none finished")
        # 4. The last run finishes the work.
        proc = start_service(tmp_path / "run4.log", "--idle-timeout", "3", batch__max_wait_s=1, **settings)
        assert proc.wait(120) == 0, proc.log()[-3000:]
        final = stats(url)
    finally:
        standin_proc.kill()
    results = kafka.read_json(settings["topics__output"], COUNT, 60)
    ids = [r["id"] for r in results]
    assert set(ids) == {r["id"] for r in rows}  # 0 lost
    batch_labeled = {r["id"] for r in results if r.get("lane") == "batch" and not r["llm"]["cached"]}
    assert final["batch_duplicates"] == 0 and final["batch_requests"] == len(batch_labeled)
    assert final["batches_created"] == created  # the last run created none: it found them
    report(f"batch lane kill test: {COUNT} reviews, 3 x kill -9, 0 lost, {final['batches_created']} batches, "
           f"{final['batch_requests']} requests in them, stand-in duplicates {final['batch_duplicates']}, "
           f"{len(ids) - len(set(ids))} duplicate outputs")  # fmt: skip
