"""Review data for the benchmarks: the shared Amazon texts read at run time (never copied), else generated,
and the backlog produced from them."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import orjson
from confluent_kafka import Producer

from consumer.offline.datasets import DatasetError, load_amazon
from consumer.sandbox.reviewgen import generate


def review_texts() -> tuple[list[str], str]:
    """The shared Amazon review texts (median ~490 chars), else generated texts of ~500 chars median."""
    try:
        texts = [str(row["text"]) for row in load_amazon()]
        return texts, "amazon-reviews-train.jsonl (shared data, read at run time)"
    except DatasetError:
        return _generated(5_000), "generated (reviewgen sentences, ~500 chars median)"


def _generated(count: int) -> list[str]:
    rng = random.Random(7)
    pieces = [review.text for review in generate(count * 3, seed=7)]
    texts = []
    for _ in range(count):
        target = rng.lognormvariate(6.2, 0.5)  # e^6.2 ~ 490 characters
        parts: list[str] = []
        while sum(map(len, parts)) < target:
            parts.append(rng.choice(pieces))
        texts.append(" ".join(parts))
    return texts


def review_value(texts: Sequence[str], index: int, prefix: str) -> bytes:
    """One input message: the texts cycled, each with a unique id."""
    return orjson.dumps({"id": f"{prefix}-{index}", "text": texts[index % len(texts)]})


def median_chars(texts: Sequence[str]) -> int:
    return int(statistics.median(len(t) for t in texts))


def texts_record(texts: Sequence[str], source: str) -> dict[str, Any]:
    """What a result file says about the review texts: where they came from and their median length."""
    return {"texts": source, "median_chars": median_chars(texts)}


def produce_backlog(bootstrap: str, topic: str, texts: Sequence[str], count: int, partitions: int) -> float:
    """Produce ``count`` reviews round-robin over the partitions as fast as possible; returns the seconds."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.kbytes": 262_144,
        }
    )
    started = time.monotonic()
    for index in range(count):
        value = review_value(texts, index, topic)
        while True:
            try:
                producer.produce(topic, value, partition=index % partitions)
                break
            except BufferError:
                producer.poll(0.05)
        if index % 20_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} reviews were not delivered to {topic}")
    return time.monotonic() - started
