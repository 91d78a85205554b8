"""Memory has byte budgets: 12,000 uncertain 90 KB reviews with the LLM saturated stay under a bound (issue 15).

The service runs as a real subprocess against the real broker and the stand-in LLM. Every review goes to the
LLM (threshold 1.0), which answers a few a minute, so without byte budgets the count limits alone
(``llm.queue_high_water`` 2,000 queued reviews, ``service.max_in_flight`` 20,000) let it hold gigabytes.

The bound, from measurements and the defaults for a 1 GiB pod: the service reading these same 90 KB reviews
with nothing held for the LLM (every review on the small path) runs at 440-670 MB, ~500 MB steady (the
model, librdkafka's fetch queue and producer buffers, and the tokenizer's high-water mark on 256-review
batches of 90 KB texts); on top of that the budgets let it hold ``service.max_in_flight_bytes`` (128 MiB)
of review text and ``llm.max_queue_bytes`` (64 MiB) of prompts for the queued reviews (a review waiting for
queue room holds only its text, not its prompt). 500 + 134 + 67 = ~700 MB, and the bound allows 800 MB for
allocator slack, under the pod's 1 GiB. It must also be flat once the input paused. Before the byte
budgets, the count limits let it read 3,300 reviews (2,000 in the LLM backlog, each with its prompt): 1,068
MB after 20 s and still growing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psutil
import pytest
from confluent_kafka import Producer

from consumer.config import LlmConfig, ServiceConfig
from tests.support import kafka
from tests.support.service import Process, start_service, start_standin, stats

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

REVIEWS = 12_000
TEXT_BYTES = 90_000
BOUND_MB = 800
FLAT_MB = 60
SENTENCE = "The kettle works but the lid is stiff and it is louder than I hoped, so I am not sure. "


def produce_long_reviews(topic: str) -> int:
    """12,000 distinct 90 KB reviews, lz4-compressed on the wire (the broker stores a few MB, not a GB)."""
    producer = Producer(
        {"bootstrap.servers": kafka.bootstrap(), "compression.type": "lz4", "linger.ms": 50,
         "batch.size": 900_000, "message.max.bytes": 1_000_000}
    )  # fmt: skip
    body = SENTENCE * (TEXT_BYTES // len(SENTENCE))
    for i in range(REVIEWS):
        value = orjson.dumps({"id": f"long-{i}", "text": f"Review {i}. {body}"})
        while True:
            try:
                producer.produce(topic, value=value)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(120) == 0
    return REVIEWS


@pytest.fixture
def saturated_llm(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(tmp_path / "standin.log", "--latency-ms", "1000-2000")
    yield url
    proc.kill()


def sample_rss(proc: Process, seconds: float, settled: Callable[[], bool]) -> list[float]:
    """RSS in MB once a second for ``seconds`` after ``settled`` first holds (or the time is up)."""
    process = psutil.Process(proc.proc.pid)
    samples: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log()[-3000:]
        samples.append(process.memory_info().rss / 2**20)
        if settled() and len(samples) >= 20:
            break
        time.sleep(1)  # a sampling period, not a synchronisation
    return samples


def test_long_uncertain_reviews_with_the_llm_saturated_stay_under_the_memory_bound(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, saturated_llm: str
) -> None:
    assert ServiceConfig().max_in_flight_bytes == 128 << 20 and LlmConfig().max_queue_bytes == 64 << 20
    settings = {
        "topics__input": topics.make("in", partitions=2), "topics__output": topics.make("out"),
        "topics__dlq": topics.make("dlq"), "topics__distill": topics.make("distill"),
        "topics__metrics": topics.make("metrics"), "kafka__group_id": kafka.unique("g"),
        "llm__base_url": saturated_llm, "llm__rpm": 120, "llm__tpm": 100_000_000, "llm__max_concurrency": 8,
        "llm__read_timeout_s": 10, "router__threshold": 1.0,
    }  # fmt: skip
    started = time.monotonic()
    produce_long_reviews(settings["topics__input"])
    produced_s = time.monotonic() - started
    proc = start_service(tmp_path / "service.log", **settings)
    try:
        samples = sample_rss(proc, 70, lambda: '"event": "paused"' in proc.log())
        peak = max(samples)
        log = proc.log()
        asked = stats(saturated_llm)["requests"]
    finally:
        proc.kill()  # measured; what it holds is uncommitted and would be read again
    paused = [orjson.loads(line) for line in log.splitlines() if '"event": "paused"' in line]
    report(
        f"12,000 uncertain 90 KB reviews, LLM saturated: peak RSS {peak:.0f} MB (bound {BOUND_MB}), "
        f"samples {[round(x) for x in samples]}, {asked} LLM requests, paused at {paused[0] if paused else None}, "
        f"produce {produced_s:.1f}s"
    )
    assert paused, "the input never paused"
    assert peak < BOUND_MB, f"peak RSS {peak:.0f} MB over the bound of {BOUND_MB} MB"
    last = samples[-10:]
    assert max(last) - min(last) < FLAT_MB, f"RSS still growing after the input paused: {last}"
