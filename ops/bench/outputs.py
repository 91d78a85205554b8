"""The service's outputs as the benchmarks time them: read whole with consumer.kafka.reader, then the rates
(from the broker's append times) and the percentiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from consumer.kafka.reader import Fetched, TopicReader, read_topics

_READ_CONF = {"fetch.max.bytes": 52_428_800}  # a 1M-review output in few fetches


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One output message: when the broker appended it, its id and path, when the service built it (the
    ``processed_at_ms`` field) and its input's CreateTime (``processed_at_ms - latency_ms``)."""

    append_ms: int
    review_id: str
    source: str
    processed_ms: int | None
    input_ms: int | None


def high_watermarks(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition -> high watermark of ``topic`` now."""
    with TopicReader({"bootstrap.servers": bootstrap}, [topic]) as reader:
        return {partition: end for (_topic, partition), end in reader.ends.items()}


def outputs_in(bootstrap: str, topic: str) -> int:
    """How many messages ``topic`` holds now (the sum of its high watermarks)."""
    return sum(high_watermarks(bootstrap, topic).values())


def read_outputs(bootstrap: str, topic: str, timeout_s: float = 120) -> list[OutputRecord]:
    """Every message now in ``topic`` (read from the start up to the high watermarks), parsed."""
    conf = {"bootstrap.servers": bootstrap} | _READ_CONF
    return [_record(message) for message in read_topics(conf, [topic], timeout_s)]


def _record(message: Fetched) -> OutputRecord:
    if message.timestamp_ms is None or message.value is None:
        raise RuntimeError(f"output {message.topic}/{message.partition}@{message.offset} has no timestamp or value")
    data = orjson.loads(message.value)
    latency, processed = data.get("latency_ms"), data.get("processed_at_ms")
    if not isinstance(processed, int):
        processed = None
    input_ms = processed - latency if isinstance(latency, int) and processed is not None else None
    return OutputRecord(message.timestamp_ms, str(data.get("id", "")), str(data.get("source", "")), processed, input_ms)


@dataclass(frozen=True)
class Throughput:
    """Rates computed from the broker's append times of the outputs."""

    outputs: int
    unique: int
    first_ms: int
    last_ms: int
    steady_per_s: float  # first output to last output
    wall_per_s: float | None  # start of the process (or client) to last output

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def throughput(records: Sequence[OutputRecord], started_ms: int | None) -> Throughput:
    stamps = sorted(r.append_ms for r in records)
    if len(stamps) < 2:
        raise RuntimeError(f"only {len(stamps)} outputs; nothing to time")
    first, last = stamps[0], stamps[-1]
    steady = (len(stamps) - 1) / max(last - first, 1) * 1000
    wall = len(stamps) / max(last - started_ms, 1) * 1000 if started_ms is not None else None
    unique = len({r.review_id for r in records})
    return Throughput(len(stamps), unique, first, last, steady, wall)


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles, ``{"p50": ..., ...}``; None when there are no values."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for point in points:
        key = f"p{point:g}"
        out[key] = ordered[min(len(ordered) - 1, int(point / 100 * len(ordered)))] if ordered else None
    return out
