"""Benchmark 2: end-to-end latency at a fixed offered load, small path and (with the stand-in LLM) large path.

    .venv/bin/python -m ops.bench.latency [--bootstrap HOST:PORT] [--max-rate N | .bench/throughput.json]
        [--load 0.5] [--seconds 45] [--repeats 2] [--threshold 0.8] [--llm-latency-ms 300-300] [--env K=V]...

The offered load is ``--load`` (default 50%) of the service's measured maximum: ``--max-rate`` or the
median steady rate in .bench/throughput.json. The service runs first and the benchmark waits until it
owns its partitions; then a paced producer sends typical reviews for ``--seconds`` (4 partitions).
Latency of one review = the broker's LogAppendTime of its output minus its input's CreateTime (the
moment our producer called ``produce``), both on this machine's clock; it is split into "in the service"
(input CreateTime to the output's ``processed_at_ms``) and "publish" (to the broker's append). The first
``--warmup`` seconds are left out. Two scenarios, in turn, ``--repeats`` times:

* small: threshold 0, every review on the small path;
* mixed: threshold ``--threshold``, the stand-in LLM at ``--llm-latency-ms`` with limits far above the
  offered load (rpm/tpm/concurrency) and the answer cache off, so the LLM path is latency-bound only.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import orjson
from confluent_kafka import Producer

from ops.bench.broker import broker, broker_pid
from ops.bench.children import Child, parse_env_pairs, standin, start_service, wait_for
from ops.bench.data import review_texts, review_value
from ops.bench.outputs import OutputRecord, outputs_in, percentiles, read_outputs
from ops.bench.report import BENCH_DIR, console, machine, median, table, write_json
from ops.bench.sampling import Sampler
from ops.bench.topics import Topics, run_id

PARTITIONS = 4
TARGET_P99_MS = 100
LLM_LIMITS = {"llm__rpm": 1_000_000, "llm__tpm": 1_000_000_000, "llm__max_concurrency": 512, "llm__cache_size": 0}


def max_rate(given: float | None) -> float:
    """``--max-rate``, else the default service's median steady rate from benchmark 1."""
    if given:
        return given
    path = BENCH_DIR / "throughput.json"
    if not path.exists():
        raise SystemExit("no .bench/throughput.json: run python -m ops.bench.throughput first or pass --max-rate")
    return float(orjson.loads(path.read_bytes())["summary"]["service"]["default"]["steady_per_s"])


def offer(bootstrap: str, topic: str, texts: Sequence[str], rate: float, seconds: float) -> dict[str, float]:
    """Produce at ``rate`` reviews/s for ``seconds``, in ticks of 2 ms, round-robin over the partitions."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "enable.idempotence": True})
    prefix = f"{topic}-{uuid.uuid4().hex[:4]}"
    started = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate)
        while sent < due:
            producer.produce(topic, review_value(texts, sent, prefix), partition=sent % PARTITIONS)
            sent += 1
        producer.poll(0)
        time.sleep(0.002)
    producer.flush(30)
    return {"sent": sent, "offered_per_s": sent / (time.monotonic() - started)}


def wait_assigned(child: Child, timeout_s: float = 60) -> None:
    """Until the service's log says it owns partitions (so the clock starts on a ready consumer)."""
    wait_for(lambda: "partitions_assigned" in child.log_path.read_text(errors="replace"), timeout_s, 0.2)
    time.sleep(1.0)  # let the first fetch sessions settle


def latencies(records: Sequence[OutputRecord], skip_before_ms: int) -> dict[str, dict[str, list[int]]]:
    """Per output path: end-to-end, in-service and publish latencies (ms) of reviews sent after the warm-up."""
    out: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.input_ms is None or record.processed_ms is None or record.input_ms < skip_before_ms:
            continue
        for path in (record.source, "all"):
            out[path]["end_to_end"].append(record.append_ms - record.input_ms)
            out[path]["in_service"].append(record.processed_ms - record.input_ms)
            out[path]["publish"].append(record.append_ms - record.processed_ms)
    return out


def timeline(records: Sequence[OutputRecord], start_ms: int) -> list[tuple[int, int, int, int]]:
    """Per second of input time: (second, reviews, p50 ms, max ms): shows whether the tail is periodic."""
    by_second: dict[int, list[int]] = defaultdict(list)
    for record in records:
        if record.input_ms is not None:
            by_second[(record.input_ms - start_ms) // 1000].append(record.append_ms - record.input_ms)
    return [
        (second, len(values), int(percentiles(values, (50,))["p50"] or 0), max(values))
        for second, values in sorted(by_second.items())
    ]


def scenario(
    topics: Topics, texts: Sequence[str], options: dict[str, Any], name: str, llm_url: str | None
) -> dict[str, Any]:
    """One service, one paced load, the latency percentiles per path."""
    source = topics.make(f"lat-{name}-in", PARTITIONS)
    settings: dict[str, Any] = topics.for_service(f"lat-{name}") | {
        "topics__input": source,
        "kafka__group_id": f"bench-lat-{name}-{uuid.uuid4().hex[:6]}",
        "router__threshold": 0 if llm_url is None else options["threshold"],
    }
    if llm_url is not None:
        settings |= LLM_LIMITS | {"llm__base_url": llm_url}
    with start_service(f"latency-{name}", topics.bootstrap, settings, options["extra_env"]) as child:
        wait_assigned(child)
        sampler = Sampler(child.pid, broker_pid(topics.bootstrap)).start()
        start_ms = time.time_ns() // 1_000_000
        offered = offer(topics.bootstrap, source, texts, options["rate"], options["seconds"])
        output = settings["topics__output"]
        wait_for(lambda: outputs_in(topics.bootstrap, output) >= offered["sent"], 120, 0.5)
        sampler.stop()
        child.terminate()
    records = read_outputs(topics.bootstrap, output)
    topics.delete([source])
    topics.delete_outputs(settings)
    per_path = latencies(records, start_ms + int(options["warmup"] * 1000))
    return {
        "timeline": timeline(records, start_ms),
        **offered,
        "outputs": len(records),
        "service_cores": round(sampler.mean_cpu() / 100, 2),
        "broker_cores": round(sampler.broker_cores(), 2),
        "other_processes_cores": round(sampler.others_cores(), 2),
        "paths": {
            path: {"count": len(parts["end_to_end"])} | {k: percentiles(v) for k, v in parts.items()}
            for path, parts in per_path.items()
        },
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of each path's percentiles, and the share of reviews per path."""
    paths = sorted({p for run in runs for p in run["paths"]})
    out: dict[str, Any] = {"offered_per_s": median([r["offered_per_s"] for r in runs]), "paths": {}}
    for path in paths:
        present = [r["paths"][path] for r in runs if path in r["paths"]]
        out["paths"][path] = {
            "count": sum(p["count"] for p in present),
            "share": median(
                [r["paths"][path]["count"] / r["paths"]["all"]["count"] for r in runs if path in r["paths"]]
            ),
        } | {
            kind: {q: median([p[kind][q] for p in present]) for q in ("p50", "p95", "p99")}
            for kind in ("end_to_end", "in_service", "publish")
        }
    return out


def render(summary: dict[str, Any], title: str) -> None:
    rows = []
    for path, s in summary["paths"].items():
        e2e, inside, publish = s["end_to_end"], s["in_service"], s["publish"]
        rows.append(
            (
                path,
                f"{s['share']:.1%}",
                *(f"{e2e[q]:.0f}" for q in ("p50", "p95", "p99")),
                f"{inside['p99']:.0f}",
                f"{publish['p99']:.0f}",
            )
        )
    columns = ["path", "share", "p50 ms", "p95 ms", "p99 ms", "p99 in service", "p99 publish"]
    table(f"{title} at {summary['offered_per_s']:,.0f} reviews/s offered (median of repeats)", columns, rows)


@click.command()
@click.option("--bootstrap", help="Kafka HOST:PORT (default: KAFKA_BOOTSTRAP, else the project broker).")
@click.option("--max-rate", type=float, help="The service's maximum, reviews/s (default: .bench/throughput.json).")
@click.option("--load", type=click.FloatRange(0.01, 1.0), default=0.5, show_default=True)
@click.option("--seconds", type=click.FloatRange(min=10), default=45.0, show_default=True)
@click.option("--warmup", type=click.FloatRange(min=0), default=10.0, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.8, show_default=True, help="Mixed scenario.")
@click.option("--llm-latency-ms", default="300-300", show_default=True, help="The stand-in's latency LO-HI.")
@click.option("--env", "env_pairs", multiple=True, help="KEY=VALUE for the service, e.g. SHUNT_MODEL__BATCH_SIZE=256.")
@click.option("--out", type=click.Path(path_type=Path), default="latency", show_default=True)
def main(**options: Any) -> None:
    """Latency percentiles at a fixed share of the measured maximum, small path and mixed."""
    options["rate"] = options["load"] * max_rate(options["max_rate"])
    options["extra_env"] = parse_env_pairs(options["env_pairs"])
    texts, text_source = review_texts()
    runs: dict[str, list[dict[str, Any]]] = {"small": [], "mixed": []}
    with (
        broker(options["bootstrap"]) as kafka,
        Topics(kafka.bootstrap, run_id()) as topics,
        standin("latency-standin", options["llm_latency_ms"]) as llm_url,
    ):
        for n in range(options["repeats"]):
            for name, url in (("small", None), ("mixed", llm_url)):
                console.print(f"repeat {n + 1}: {name} at {options['rate']:,.0f} reviews/s")
                runs[name].append(scenario(topics, texts, options, f"{name}-r{n}", url))
    summary = {name: summarise(r) for name, r in runs.items()}
    render(summary["small"], "small path (threshold 0)")
    render(summary["mixed"], f"mixed (threshold {options['threshold']}, LLM {options['llm_latency_ms']} ms)")
    p99 = summary["small"]["paths"]["small"]["end_to_end"]["p99"]
    console.print(
        f"small-path p99 {p99:.0f} ms: target < {TARGET_P99_MS} ms {'met' if p99 < TARGET_P99_MS else 'MISSED'}"
    )
    write_json(
        str(options["out"]),
        {"machine": machine(), "texts": text_source, "options": _jsonable(options), "summary": summary, "runs": runs},
    )


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}


if __name__ == "__main__":
    main()
