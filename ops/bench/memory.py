"""Benchmark 3: the service's memory while a large backlog waits and the LLM path is saturated.

    .venv/bin/python -m ops.bench.memory [--reviews 1000000] [--bootstrap HOST:PORT] [--seconds 180]
        [--warmup 30] [--llm-latency-ms 2000-3000] [--rpm 60]

Pre-produces ``--reviews`` typical reviews (4 partitions), then runs the service with threshold 1.0 (every
review goes to the LLM), the stand-in LLM slow and the client's RPM low, so the LLM backlog fills, the
service pauses its partitions and the rest of the backlog waits on the broker. psutil samples the
service's RSS every 0.5 s for ``--seconds``. Reported: peak RSS, steady RSS (median after ``--warmup``),
the spread after the warm-up ((max - min) / median; flat means within 10%), the linear trend after the
warm-up (MB per minute; a leak shows here first), and the targets (flat, < 300 MB: issue 18).
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

import click
import orjson

from ops.bench.broker import broker, broker_pid
from ops.bench.children import standin, start_service
from ops.bench.data import produce_backlog, review_texts, texts_record
from ops.bench.outputs import outputs_in
from ops.bench.report import console, machine, table, write_json
from ops.bench.sampling import Sampler
from ops.bench.topics import Topics, run_id

PARTITIONS = 4
TARGET_MB = 300
TARGET_SPREAD = 0.10


def rss_stats(samples: list[tuple[float, int]], warmup_s: float) -> dict[str, Any]:
    """Peak over the run; steady, spread and trend after the warm-up. ``samples``: (seconds since start, bytes)."""
    mb = [(t, rss / 2**20) for t, rss in samples]
    after = [(t, v) for t, v in mb if t >= warmup_s]
    values = [v for _, v in after]
    steady = statistics.median(values)
    slope = statistics.linear_regression([t for t, _ in after], values).slope * 60 if len(after) > 2 else 0.0
    spread = (max(values) - min(values)) / steady
    return {
        "peak_mb": round(max(v for _, v in mb), 1),
        "steady_mb": round(steady, 1),
        "min_after_warmup_mb": round(min(values), 1),
        "max_after_warmup_mb": round(max(values), 1),
        "spread_after_warmup": round(spread, 4),
        "trend_mb_per_min": round(slope, 2),
        "flat_within_10pct": spread <= TARGET_SPREAD,
        "under_target": max(v for _, v in mb) < TARGET_MB,
    }


def log_events(text: str) -> dict[str, int]:
    """How often the service paused and resumed its partitions (backpressure at work)."""
    counts = {"paused": 0, "resumed": 0}
    for line in text.splitlines():
        if line.startswith("{"):
            event = orjson.loads(line).get("event")
            if event in counts:
                counts[event] += 1
    return counts


def run(topics: Topics, source: str, options: dict[str, Any], llm_url: str) -> dict[str, Any]:
    settings = topics.for_service("mem") | {
        "topics__input": source,
        "kafka__group_id": f"bench-mem-{uuid.uuid4().hex[:6]}",
        "router__threshold": 1.0,
        "llm__base_url": llm_url,
        "llm__rpm": options["rpm"],
    }
    with start_service("memory", topics.bootstrap, settings) as child:
        sampler = Sampler(child.pid, broker_pid(topics.bootstrap)).start()
        started = time.monotonic()
        time.sleep(options["seconds"])
        sampler.stop()
        outputs = outputs_in(topics.bootstrap, settings["topics__output"])
        child.terminate()
        events = log_events(child.log_path.read_text(errors="replace"))
    samples = [(s.mono - started, s.rss) for s in sampler.samples]
    return {
        "rss": rss_stats(samples, options["warmup"]),
        "samples_mb": [(round(t, 1), round(rss / 2**20, 1)) for t, rss in samples],
        "outputs_during_run": outputs,
        "events": events,
        "service_cores": round(sampler.mean_cpu() / 100, 2),
    }


def render(result: dict[str, Any], options: dict[str, Any]) -> None:
    rss = result["rss"]
    rows = [
        ("peak RSS", f"{rss['peak_mb']:.0f} MB", f"< {TARGET_MB} MB: " + ("met" if rss["under_target"] else "MISSED")),
        ("steady RSS (median after warm-up)", f"{rss['steady_mb']:.0f} MB", ""),
        (
            "spread after warm-up (max - min) / median",
            f"{rss['spread_after_warmup']:.1%}",
            "<= 10%: " + ("met" if rss["flat_within_10pct"] else "MISSED"),
        ),
        ("trend after warm-up", f"{rss['trend_mb_per_min']:+.2f} MB/min", ""),
        ("outputs during the run / backlog", f"{result['outputs_during_run']:,} / {options['reviews']:,}", ""),
        ("pauses / resumes (backpressure)", f"{result['events']['paused']} / {result['events']['resumed']}", ""),
    ]
    title = (
        f"service memory, {options['reviews']:,}-review backlog, LLM saturated "
        f"(threshold 1.0, rpm {options['rpm']}, stand-in {options['llm_latency_ms']} ms), {options['seconds']:g} s"
    )
    table(title, ["measure", "value", "target"], rows)


@click.command()
@click.option("--reviews", type=click.IntRange(min=1_000), default=1_000_000, show_default=True)
@click.option("--bootstrap", help="Kafka HOST:PORT (default: KAFKA_BOOTSTRAP, else the project broker).")
@click.option("--seconds", type=click.FloatRange(min=30), default=180.0, show_default=True)
@click.option("--warmup", type=click.FloatRange(min=0), default=30.0, show_default=True)
@click.option("--llm-latency-ms", default="2000-3000", show_default=True, help="The stand-in's latency LO-HI.")
@click.option("--rpm", type=click.IntRange(min=1), default=60, show_default=True, help="The client's RPM.")
@click.option("--out", default="memory", show_default=True)
def main(**options: Any) -> None:
    """Peak and steady RSS of the service with a large backlog and the LLM path saturated."""
    texts, text_source = review_texts()
    with (
        broker(options["bootstrap"]) as kafka,
        Topics(kafka.bootstrap, run_id()) as topics,
        standin("memory-standin", options["llm_latency_ms"]) as llm_url,
    ):
        source = topics.make("mem-in", PARTITIONS)
        console.print(f"producing {options['reviews']:,} reviews")
        produce_s = produce_backlog(kafka.bootstrap, source, texts, options["reviews"], PARTITIONS)
        console.print(f"running the service for {options['seconds']:g} s")
        result = run(topics, source, options, llm_url)
    render(result, options)
    write_json(
        options["out"],
        {
            "machine": machine(),
            **texts_record(texts, text_source),
            "options": options,
            "produce_seconds": round(produce_s, 1),
            **result,
        },
    )


if __name__ == "__main__":
    main()
