"""The batch lane end to end (issue 16): ``shunt run`` as a subprocess on the real broker, the stand-in's
Batch API over HTTP. ``lane = batch`` labels every review once, at the batch price, with the input committed
long before the batches end; ``overflow`` keeps the online RPM busy and sends the rest to batches instead of
pausing, for less than an online-only run; expired and failed items end labeled online or in the fallback."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer import contracts
from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.service import Process, control, service_env, start_service, start_standin, stats

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

REVIEWS = 20_000  # the count; one run of it takes about a minute on the shared 2-core box


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(tmp_path / "standin.log", "--rpm", "1000000", "--tpm", "1000000000")
    yield url
    proc.kill()


def reviews(count: int, seed: int) -> list[dict[str, Any]]:
    return [r.as_dict() for r in generate(count, seed=seed, hard_share=0.3, prefix=f"b{seed}")]


def lane_settings(topics: kafka.Topics, url: str, lane: str, **extra: Any) -> dict[str, Any]:
    return {
        "topics__input": topics.make("in", partitions=2), "topics__output": topics.make("out"),
        "topics__dlq": topics.make("dlq"), "topics__distill": topics.make("distill"),
        "topics__metrics": topics.make("metrics"), "topics__deferred": topics.make("deferred", partitions=2),
        "kafka__group_id": kafka.unique("g"), "llm__base_url": url, "llm__lane": lane,
        "llm__rpm": 1_000_000, "llm__tpm": 1_000_000_000, "router__threshold": 0.97,
        "batch__max_requests": 5_000, "batch__max_wait_s": 2, "batch__poll_interval_s": 0.5,
        "service__commit_interval_s": 0.2,
        "audit__rate": 0,  # the closed loop's audits ask online whatever the lane: counted apart, not here
    } | extra  # fmt: skip


def input_done_at(group: str, topic: str, count: int, proc: Process, timeout_s: float) -> float:
    """The monotonic time at which the input group's committed offsets reach the end of the topic."""
    deadline = time.monotonic() + timeout_s
    while sum(o for o in kafka.committed(group, topic, 2).values() if o > 0) < count:
        assert proc.proc.poll() is None, proc.log()[-3000:]
        assert time.monotonic() < deadline, "the input's committed offset never reached the end"
        time.sleep(0.1)  # polling the broker's committed offsets, with a deadline
    return time.monotonic()


def labeled(settings: dict[str, Any], count: int, timeout_s: float = 120) -> list[dict[str, Any]]:
    return kafka.read_json(settings["topics__output"], count, timeout_s)


def cost_of_batch_tokens(counters: dict[str, Any], factor: float = 0.5) -> float:
    prompt, completion = counters["batch_prompt_tokens"], counters["batch_completion_tokens"]
    return (prompt * 0.15 + completion * 0.60) / 1e6 * factor  # the stand-in's price (llm.prices.standin)


def test_batch_lane_labels_every_review_once_at_the_batch_price(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, standin: str
) -> None:
    control(standin, batch_turnaround_s=25.0)
    settings = lane_settings(topics, standin, "batch")
    rows = reviews(REVIEWS, seed=16)
    kafka.produce_reviews(settings["topics__input"], rows)
    started = time.monotonic()
    proc = start_service(tmp_path / "service.log", "--idle-timeout", "3", **settings)
    input_at = input_done_at(settings["kafka__group_id"], settings["topics__input"], REVIEWS, proc, 90) - started
    assert stats(standin)["batches_completed"] == 0  # every batch is still out when the input is committed
    code = proc.wait(150)
    batches_at = time.monotonic() - started
    assert code == 0, proc.log()[-3000:]
    results = labeled(settings, REVIEWS)
    ids = Counter(r["id"] for r in results)
    assert set(ids) == {r["id"] for r in rows} and max(ids.values()) == 1
    for result in results[:500]:
        contracts.validate("labeled", result)
    paths = Counter((r.get("lane", "online"), r["source"]) for r in results)
    assert set(paths) <= {("online", "small"), ("batch", "large")}, paths
    counters = stats(standin)
    assert counters["answered"] == 0 and counters["batch_duplicates"] == 0
    paid = [r for r in results if r.get("lane") == "batch" and not r["llm"]["cached"]]
    assert counters["batch_requests"] == len(paid)  # identical reviews in a batch share one request
    cost = sum(r["cost_usd"] for r in results)
    assert cost == pytest.approx(cost_of_batch_tokens(counters), rel=1e-6)
    assert batches_at > input_at + 15
    report(f"batch lane, {REVIEWS} reviews: small {paths[('online', 'small')]}, batch {paths[('batch', 'large')]}")
    made, duplicates = counters["batches_created"], counters["batch_duplicates"]
    report(f"batch lane: input committed to the end at {input_at:.1f} s, batches done and published at "
           f"{batches_at:.1f} s; {made} batches, duplicates {duplicates}")  # fmt: skip
    report(f"batch lane: cost ${cost:.6f} = stand-in batch tokens x 0.5 x price ${cost_of_batch_tokens(counters):.6f}")


def paused_spans(log: str) -> list[float]:
    """How long each pause of the input lasted, from the service's own paused/resumed events."""
    spans, paused_at = [], None
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        event = orjson.loads(line)
        if event.get("event") == "paused":
            paused_at = event.get("timestamp")
        elif event.get("event") == "resumed" and paused_at is not None:
            spans.append(_seconds(event["timestamp"]) - _seconds(paused_at))
            paused_at = None
    return spans


def _seconds(stamp: str) -> float:
    hours, minutes, seconds = re.findall(r"T(\d+):(\d+):([\d.]+)", stamp)[0]
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def run_overflow_or_online(
    topics: kafka.Topics, tmp_path: Path, url: str, lane: str, rows: list[dict[str, Any]], rpm: int
) -> tuple[list[dict[str, Any]], float, Process]:
    settings = lane_settings(
        topics, url, lane, llm__rpm=rpm, llm__queue_high_water=40, llm__queue_low_water=10,
        llm__max_concurrency=4, batch__max_wait_s=1, router__threshold=0.999,
    )  # fmt: skip
    kafka.produce_reviews(settings["topics__input"], rows)
    started = time.monotonic()
    proc = start_service(tmp_path / f"{lane}.log", "--idle-timeout", "3", **settings)
    code = proc.wait(150)
    assert code == 0, proc.log()[-3000:]
    return labeled(settings, len(rows)), time.monotonic() - started, proc


def rpm_used(results: list[dict[str, Any]], rpm: int) -> float:
    """Online answers per minute while the online lane was busy (first to last answer), over the RPM."""
    stamps = sorted(r["processed_at_ms"] for r in results if r.get("lane", "online") == "online" and r["llm"])
    minutes = (stamps[-1] - stamps[0]) / 60_000
    return (len(stamps) - 1) / minutes / rpm


def test_overflow_keeps_the_online_rpm_busy_and_batches_the_rest(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, standin: str
) -> None:
    control(standin, batch_turnaround_s=3.0)
    rows, rpm = reviews(3_000, seed=17), 300
    results, elapsed, proc = run_overflow_or_online(topics, tmp_path, standin, "overflow", rows, rpm)
    assert {r["id"] for r in results} == {r["id"] for r in rows}
    paths = Counter((r.get("lane", "online"), r["source"]) for r in results)
    cached = sum(1 for r in results if r.get("lane", "online") == "online" and r["llm"] and r["llm"]["cached"])
    assert paths[("batch", "large")] > 0 and paths[("online", "large")] == stats(standin)["answered"] + cached
    used = rpm_used(results, rpm)
    spans = paused_spans(proc.log())
    overflow_cost = sum(r["cost_usd"] for r in results)
    control(standin, reset_stats=True)
    online, online_s, online_proc = run_overflow_or_online(topics, tmp_path, standin, "online", rows, 1_000_000)
    online_cost = sum(r["cost_usd"] for r in online)
    online_spans = paused_spans(online_proc.log())  # the same reading sees the online lane's pauses
    online_n, batch_n, small_n = paths[("online", "large")], paths[("batch", "large")], paths[("online", "small")]
    report(f"overflow: {len(rows)} reviews in {elapsed:.1f} s; online {online_n}, batch {batch_n}, small "
           f"{small_n}; online RPM used {used:.1%} of {rpm}")  # fmt: skip
    longest = max(spans, default=0.0)
    report(f"overflow: longest input pause {longest:.2f} s ({len(spans)} pauses); batching interval 1 s; the "
           f"online-only run paused {len(online_spans)} times")  # fmt: skip
    report(f"overflow cost ${overflow_cost:.6f} vs online-only ${online_cost:.6f} (same stream, RPM unlimited, "
           f"{online_s:.1f} s)")  # fmt: skip
    assert max(spans, default=0.0) <= 1.0, spans  # never paused longer than one batching interval
    assert used >= 0.95, used
    assert overflow_cost < online_cost


def test_a_separate_batch_stage_answers_expired_and_failed_items_online_and_loses_none(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, standin: str
) -> None:
    """``shunt run`` with batch.in_service = false only defers; ``shunt batch`` runs the stage alone."""
    control(standin, batch_turnaround_s=1.0, batch_item_failure_rate=0.1, batch_expire_rate=0.1)
    settings = lane_settings(topics, standin, "batch", batch__in_service="false", batch__max_requests=200)
    rows = reviews(2_000, seed=18)
    kafka.produce_reviews(settings["topics__input"], rows)
    service = start_service(tmp_path / "service.log", "--idle-timeout", "3", **settings)
    stage = Process(
        [sys.executable, "-m", "consumer", "batch", "--idle-timeout", "5"], service_env(**settings),
        tmp_path / "batch.log",
    )  # fmt: skip
    assert service.wait(90) == 0, service.log()[-3000:]
    assert stage.wait(120) == 0, stage.log()[-3000:]
    results = labeled(settings, len(rows))
    assert {r["id"] for r in results} == {r["id"] for r in rows}  # none lost
    counters = stats(standin)
    retried = counters["batch_items_failed"] + counters["batch_items_expired"]
    paths = Counter((r.get("lane", "online"), r["source"]) for r in results)
    online = [r for r in results if r.get("lane") == "online"]
    assert retried > 0 and len(online) == paths[("online", "large")] >= retried, (paths, counters)
    # each failed or expired request is asked again online, with the identical reviews that shared it
    fresh = sum(1 for r in online if not r["llm"]["cached"])  # the rest share an identical review's answer
    assert counters["answered"] == fresh
    paid = [r for r in results if r.get("lane") == "batch" and not r["llm"]["cached"]]
    assert len(paid) == counters["batch_requests"] - retried
    report(f"separate shunt batch: {counters['batches_created']} batches, {counters['batches_expired']} expired; "
           f"{counters['batch_items_failed']} failed and {counters['batch_items_expired']} expired items answered "
           f"online, {paths[('batch', 'large')]} by batches, 0 lost")  # fmt: skip


def test_the_demo_shows_the_overflow(report: Callable[[str], None], tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    demo = Process(
        [sys.executable, "-m", "consumer", "demo", "--bootstrap", kafka.bootstrap(), "--lane", "overflow",
         "--reviews", "1200", "--rate", "150", "--summary-json", str(summary_path)],
        service_env(), tmp_path / "demo.log",
    )  # fmt: skip
    assert demo.wait(150) == 0, demo.log()[-3000:]
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["labelled"] == 1200 and summary["lane"] == "overflow"
    assert summary["lanes"]["online"] > 0 and summary["lanes"]["batch"] > 0 and summary["batches"] > 0
    assert "by " in demo.log() and "batches at half price" in demo.log()
    report(f"shunt demo --lane overflow: {summary['lanes']} LLM answers by lane, {summary['batches']} batches, "
           f"paid {summary['money']['cost_ratio']:.1%} of the all-LLM baseline")  # fmt: skip
