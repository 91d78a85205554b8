"""The two ceilings the service's throughput is judged against, measured in the same run as the service.

* scorer alone: ``OnnxScorer.predict`` (tokenise + ONNX + softmax + Prediction objects) on the same review
  texts in memory, one process, at the best of several batch sizes;
* Kafka alone: a plain confluent-kafka consume -> produce passthrough of the same input topic to a fresh
  output topic, with the service's own client settings (``consumer.config.librdkafka_config``), the
  service's poll batch size and wait, and no model, no JSON, no per-message Python work beyond the copy.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, Message, Producer

from consumer.app import load_scorer
from consumer.config import KafkaConfig, Settings, librdkafka_config
from consumer.small.scoring import OnnxScorer
from ops.bench.outputs import read_outputs, throughput
from ops.bench.sampling import busy_seconds
from ops.bench.topics import LOG_APPEND, Topics


def load_default_scorer() -> OnnxScorer:
    """The scorer exactly as the service loads it with default settings."""
    return load_scorer(Settings())


def scorer_rates(
    scorer: OnnxScorer, texts: Sequence[str], reviews: int, batch_sizes: Sequence[int]
) -> dict[int, dict[str, float]]:
    """Per batch size: reviews/s of ``predict`` over ``reviews`` texts (cycled), the CPU microseconds per
    review (all threads of this process: tokenizers' pool, ONNX Runtime's) and the cores kept busy."""
    sample = [texts[i % len(texts)] for i in range(reviews)]
    rates: dict[int, dict[str, float]] = {}
    for size in batch_sizes:
        batches = [sample[i : i + size] for i in range(0, len(sample), size)]
        scorer.predict(batches[0])
        started, cpu, machine = time.perf_counter(), time.process_time(), busy_seconds()
        for batch in batches:
            scorer.predict(batch)
        wall, cpu, machine = time.perf_counter() - started, time.process_time() - cpu, busy_seconds() - machine
        rates[size] = {
            "per_s": len(sample) / wall,
            "cpu_us_per_review": cpu / len(sample) * 1e6,
            "cores": cpu / wall,
            "other_processes_cores": max(0.0, (machine - cpu) / wall),
        }
    return rates


def passthrough(topics: Topics, source: str, count: int, settings: Settings, timeout_s: float = 300) -> dict[str, Any]:
    """Copy ``count`` messages from ``source`` to a fresh topic; rates from the broker's append times."""
    target = topics.make("passthrough-out", 1, LOG_APPEND)
    kafka = KafkaConfig(bootstrap_servers=topics.bootstrap, group_id=f"bench-pass-{uuid.uuid4().hex[:6]}")
    started_ms, cpu = time.time_ns() // 1_000_000, time.process_time()
    consumer = Consumer(librdkafka_config(kafka, "consumer"))
    producer = Producer(librdkafka_config(kafka, "producer"))
    try:
        consumer.subscribe([source])
        _copy(consumer, producer, target, count, settings, time.monotonic() + timeout_s)
        left = producer.flush(60)
    finally:
        consumer.close()
    cpu = time.process_time() - cpu
    rates = throughput(read_outputs(topics.bootstrap, target), started_ms)
    topics.delete([target])
    return {"throughput": rates.as_dict(), "undelivered": left, "client_cpu_us_per_review": cpu / count * 1e6}


def _copy(consumer: Consumer, producer: Producer, target: str, count: int, settings: Settings, deadline: float) -> None:
    batch, wait = settings.model.batch_size, max(settings.model.batch_max_wait_ms / 1000, 0.001)
    moved = 0
    while moved < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"passthrough moved only {moved} of {count}")
        for message in consumer.consume(batch, wait):
            if message.error() is None:
                _produce(producer, target, message)
                moved += 1
        producer.poll(0)


def _produce(producer: Producer, target: str, message: Message) -> None:
    while True:
        try:
            producer.produce(target, message.value(), message.key())
            return
        except BufferError:
            producer.poll(0.005)


def rate_of(result: dict[str, Any]) -> float:
    tp: dict[str, Any] = result["throughput"]
    return float(tp["steady_per_s"])
