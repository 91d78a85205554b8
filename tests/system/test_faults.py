"""Losing nothing: out-of-order completion, kill -9, a second instance leaving and joining, a broker restart,
and a huge backlog with the LLM path saturated. The service runs as a real subprocess against the real broker."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from confluent_kafka.admin import AdminClient

from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.paths import ROOT
from tests.support.service import Collector, Process, control, start_service, start_standin, stats

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]


def reviews(count: int, seed: int) -> list[dict[str, Any]]:
    return [r.as_dict() for r in generate(count, seed=seed, hard_share=0.2, prefix=f"f{seed}")]


def write_labels(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"text": r["text"], "label": r["label"]}) + b"\n" for r in rows))
    return path


@pytest.fixture
def fast_llm(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(
        tmp_path / "standin.log", "--latency-ms", "1-5", "--rpm", "1000000", "--tpm", "1000000000"
    )
    yield url
    proc.kill()


def settings_for(topics: kafka.Topics, partitions: int, llm_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "topics__input": topics.make("in", partitions=partitions), "topics__output": topics.make("out"),
        "topics__dlq": topics.make("dlq"), "topics__distill": topics.make("distill"),
        "topics__metrics": topics.make("metrics"), "kafka__group_id": kafka.unique("g"), "llm__base_url": llm_url,
        "llm__rpm": 1_000_000, "llm__tpm": 1_000_000_000, "llm__max_concurrency": 32, "router__threshold": 0.95,
    } | extra  # fmt: skip


def assert_all_labeled(out: Collector, expected: list[dict[str, Any]], timeout_s: float = 120) -> int:
    """Every expected id is in the output; returns the number of duplicates."""
    want = {r["id"] for r in expected}
    deadline = time.monotonic() + timeout_s
    while not want <= set(out.ids()):
        out.poll()
        if time.monotonic() > deadline:
            missing = want - set(out.ids())
            raise AssertionError(f"{len(missing)} reviews never labeled, e.g. {sorted(missing)[:5]}")
    return len(out.ids()) - len(set(out.ids()))


def test_committed_offset_never_passes_an_unfinished_message(
    topics: kafka.Topics, tmp_path: Path, fast_llm: str
) -> None:
    settings = settings_for(topics, 1, fast_llm, router__threshold=1.0, service__commit_interval_s=0.2)
    rows = reviews(60, seed=11)
    control(fast_llm, latency_ms=[6000, 6000])  # the earliest offsets will hang at the LLM
    kafka.produce_reviews(settings["topics__input"], rows[:5])
    proc = start_service(tmp_path / "service.log", "--idle-timeout", "5", **settings)
    kafka.wait_for(lambda: stats(fast_llm)["requests"] >= 5, 60, "the first five reach the LLM")
    control(fast_llm, latency_ms=[1, 5])
    kafka.produce_reviews(settings["topics__input"], rows[5:])
    out = Collector(settings["topics__output"])
    try:
        out.wait_count(55, 60)  # the later ones finish first
        group, topic = settings["kafka__group_id"], settings["topics__input"]
        slow_pending = {r["id"] for r in rows[:5]} - set(out.ids())
        assert slow_pending, "the slow reviews finished too early for this test to mean anything"
        assert kafka.committed(group, topic, 1)[0] <= 0, "committed past a message that is not done"
        out.wait_count(60, 60)
        assert proc.wait(60) == 0, proc.log()[-3000:]
        assert kafka.committed(group, topic, 1)[0] == 60
    finally:
        out.close()
        proc.kill()


def test_kill_9_three_times_loses_nothing(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, fast_llm: str
) -> None:
    rows = reviews(20_000, seed=12)
    settings = settings_for(topics, 4, fast_llm)
    kafka.produce_reviews(settings["topics__input"], rows)
    out = Collector(settings["topics__output"])
    rnd = random.Random(12)
    try:
        for run in range(3):
            proc = start_service(tmp_path / f"run{run}.log", **settings)
            # A random moment after this instance has made progress of its own.
            out.wait_count(out.poll() + rnd.randint(500, 4000), 180)
            proc.proc.send_signal(signal.SIGKILL)
            proc.kill()
            report(f"kill -9 #{run + 1} at {len(set(out.ids()))} distinct outputs ({len(out.ids())} in all)")
        final = start_service(tmp_path / "final.log", "--idle-timeout", "8", **settings)
        duplicates = assert_all_labeled(out, rows, 240)
        assert final.wait(120) == 0, final.log()[-3000:]
        report(f"crash test: {len(rows)} reviews, 3 x kill -9, 0 lost, {duplicates} duplicates")
    finally:
        out.close()


def test_kill_9_five_times_with_llm_work_in_flight_and_a_second_instance_loses_nothing(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, fast_llm: str
) -> None:
    """Issue 14: five kill -9 of the main instance, each with LLM answers in flight (threshold 0.99 sends about
    a third of the reviews to a stand-in taking 50-150 ms), while a second instance joins and leaves."""
    rows = reviews(20_000, seed=17)
    settings = settings_for(topics, 4, fast_llm, router__threshold=0.99)
    control(fast_llm, latency_ms=[50, 150])
    kafka.produce_reviews(settings["topics__input"], rows)
    out = Collector(settings["topics__output"])
    rnd = random.Random(17)
    second: Process | None = None
    try:
        for run in range(5):
            proc = start_service(tmp_path / f"run{run}.log", **settings)
            if run in (1, 3):
                second = start_service(tmp_path / f"second{run}.log", **settings)  # joins
            out.wait_count(out.poll() + rnd.randint(400, 2000), 180)
            llm = stats(fast_llm)
            in_flight = llm["requests"] - llm["answered"]  # LLM answers the killed instance waited for
            proc.proc.send_signal(signal.SIGKILL)
            proc.kill()
            if second is not None and run in (2, 4):
                second.signal(signal.SIGTERM)  # leaves
                assert second.wait(60) == 0, second.log()[-3000:]
                second = None
            report(f"kill -9 #{run + 1} at {len(set(out.ids()))} distinct outputs, {in_flight} LLM requests in flight")
        final = start_service(tmp_path / "final.log", "--idle-timeout", "8", **settings)
        duplicates = assert_all_labeled(out, rows, 300)
        assert final.wait(120) == 0, final.log()[-3000:]
        report(f"crash test: {len(rows)} reviews, 5 x kill -9, second instance joined and left twice, 0 lost, "
               f"{duplicates} duplicates")  # fmt: skip
    finally:
        out.close()
        if second is not None:
            second.kill()


def test_two_instances_one_stopped_and_started_mid_run(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, fast_llm: str
) -> None:
    rows = reviews(10_000, seed=13)
    settings = settings_for(topics, 4, fast_llm)
    kafka.produce_reviews(settings["topics__input"], rows)
    out = Collector(settings["topics__output"])
    first = start_service(tmp_path / "a.log", "--idle-timeout", "10", **settings)
    second = start_service(tmp_path / "b.log", **settings)
    try:
        out.wait_count(len(rows) // 4, 180)
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0, second.log()[-3000:]
        out.wait_count(len(rows) // 2, 180)
        second = start_service(tmp_path / "b2.log", "--idle-timeout", "10", **settings)
        duplicates = assert_all_labeled(out, rows, 240)
        assert first.wait(120) == 0 and second.wait(120) == 0
        assert "partitions_revoked" in first.log()
        report(f"two instances, one stopped and restarted: 0 lost, {duplicates} duplicates")
    finally:
        out.close()
        first.kill()
        second.kill()


def _managed_broker(address: str) -> bool:
    script = str(ROOT / "ops/kafka/kafka.sh")
    status = subprocess.run(["bash", script, "status"], check=False, capture_output=True, text=True)
    return status.returncode == 0 and address in status.stdout + status.stderr


def test_broker_restart_mid_run_recovers_by_itself(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, fast_llm: str
) -> None:
    if not _managed_broker(kafka.bootstrap()):
        pytest.skip("the broker at KAFKA_BOOTSTRAP is not the one ops/kafka/kafka.sh manages, so it cannot restart it")
    rows = reviews(8_000, seed=14)
    settings = settings_for(topics, 2, fast_llm)
    kafka.produce_reviews(settings["topics__input"], rows)
    out = Collector(settings["topics__output"])
    proc = start_service(tmp_path / "service.log", "--idle-timeout", "15", **settings)
    try:
        out.wait_count(len(rows) // 5, 180)
        subprocess.run(["bash", str(ROOT / "ops/kafka/kafka.sh"), "stop"], check=True, timeout=60)
        subprocess.run(["bash", str(ROOT / "ops/kafka/kafka.sh"), "start"], check=True, timeout=120)
        try:
            duplicates = assert_all_labeled(out, rows, 240)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nservice log tail:\n{proc.log()[-4000:]}") from None
        assert proc.wait(120) == 0, proc.log()[-3000:]
        report(f"broker restart mid-run: 0 lost, {duplicates} duplicates")
    finally:
        out.close()
        proc.kill()


def _members(admin: AdminClient, group: str) -> int:
    described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return len(described.members)


def test_backlog_memory_stays_flat_and_consumer_stays_in_group(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, kafka_admin: AdminClient
) -> None:
    rows = reviews(200_000, seed=15)
    proc_llm, slow_llm = start_standin(tmp_path / "standin.log", "--latency-ms", "200-400")
    settings = settings_for(topics, 4, slow_llm, router__threshold=1.0, llm__rpm=600, llm__max_concurrency=8)
    kafka.produce_reviews(settings["topics__input"], rows)
    proc = start_service(tmp_path / "service.log", **settings)
    try:
        samples = _sample_rss(proc, kafka_admin, settings["kafka__group_id"], seconds=45)
        warm = samples[len(samples) // 3 :]
        base, peak = warm[0], max(warm)
        report(f"backlog RSS MB: start {samples[0]:.0f}, after warm-up {base:.0f}, peak {peak:.0f}")
        assert peak <= base * 1.10, f"RSS grew from {base:.0f} MB to {peak:.0f} MB under backlog"
        assert peak < 500
        log = proc.log()
        assert "partitions_revoked" not in log and "partitions_lost" not in log
        assert '"event": "paused"' in log
    finally:
        proc.kill()
        proc_llm.kill()


def _sample_rss(proc: Process, admin: AdminClient, group: str, seconds: float) -> list[float]:
    process = psutil.Process(proc.proc.pid)
    kafka.wait_for(lambda: _members(admin, group) == 1, 60, "the service joins its group")
    samples: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log()[-3000:]
        samples.append(process.memory_info().rss / 2**20)
        assert _members(admin, group) == 1, "the consumer left its group"
        time.sleep(1)  # a sampling period, not a synchronisation
    return samples


def test_output_counts_match_input_per_source(topics: kafka.Topics, tmp_path: Path, fast_llm: str) -> None:
    rows = reviews(500, seed=16)
    settings = settings_for(topics, 2, fast_llm)
    kafka.produce_reviews(settings["topics__input"], rows)
    proc = start_service(tmp_path / "service.log", "--max-messages", str(len(rows)), **settings)
    assert proc.wait(120) == 0, proc.log()[-3000:]
    results = kafka.read_json(settings["topics__output"], len(rows))
    assert Counter(r["id"] for r in results) == Counter(r["id"] for r in rows)
