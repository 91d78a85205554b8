"""The comparison (issue 18): the service, its ceiling, a Quix Streams peer and Kafka alone, in one run.

    .venv/bin/python -m ops.bench.compare [--reviews 100000] [--bootstrap HOST:PORT] [--profile]

One broker (``--bootstrap``, else ``KAFKA_BOOTSTRAP``, else the project broker, else one started with
ops/kafka/kafka.sh and stopped at the end), one input topic: ``--reviews`` of the shared Amazon texts (cycled
with unique ids; never written anywhere but the broker) on 4 partitions, then, in this order:

1. **ceiling**: the scorer alone in memory (tokenise + ONNX + softmax), every configuration in
   ``CONFIGS`` (workers, ONNX Runtime threads, the tokenizer's thread pool) at every batch in ``BATCHES``;
   the ceiling is the best of them, and its CPU per review is the scorer's;
2. **service**: ``shunt run`` with default settings (threshold 0: every review takes the small path), a
   fresh group, stopping by itself after the last review;
3. **peer**: the Quix Streams app of :mod:`ops.bench.peer_quix` on the same topic (its own venv);
4. **passthrough**: plain confluent-kafka consume -> produce, no model;
and the ceiling's best configuration once more just before and just after the service (the *paired* ratio:
the same configuration under the same load as the service, reported beside the best-of-all ceiling).

Rates come from the broker's LogAppendTime of each output topic (first output to last). CPU per review is
sampled per process (the service or the peer, and the broker apart), and every figure carries the load
average and the cores other processes used meanwhile: the machine is shared. ``--profile`` adds one more
service run under py-spy. The JSON is written to ``.bench/<out>.json``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from consumer.config import DEFAULT_MODEL_DIR, Settings
from consumer.small.scoring import OnnxScorer
from ops.bench import peer_quix
from ops.bench.broker import broker, broker_pid
from ops.bench.ceilings import passthrough, rate_of
from ops.bench.children import Child, wait_for
from ops.bench.data import produce_backlog, review_texts, texts_record
from ops.bench.outputs import outputs_in, read_outputs, throughput
from ops.bench.profiling import show
from ops.bench.report import console, machine, table, write_json
from ops.bench.sampling import Sampler, busy_seconds, cpu_per_review
from ops.bench.throughput import Variant, profile_run, service_run
from ops.bench.topics import LOG_APPEND, Topics, run_id

BATCHES = (64, 256, 1024)
GOAL_SHARE, GOAL_CPU, GOAL_PEER = 0.85, 1.2, 4.0


@dataclass(frozen=True)
class Config:
    """One way to run the scorer alone: threads scoring at once, ONNX Runtime threads each, tokenizer pool."""

    workers: int
    intra_op_threads: int
    tokenizer_pool: bool

    @property
    def name(self) -> str:
        threads = "ORT picks threads" if self.intra_op_threads == 0 else f"{self.intra_op_threads} ORT thread"
        pool = "tokenizer pool on" if self.tokenizer_pool else "tokenizer pool off"
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}, {threads}, {pool}"


CONFIGS = (Config(1, 0, True), Config(1, 1, False), Config(2, 1, False), Config(2, 0, True))


def load() -> float:
    return round(os.getloadavg()[0], 2)


def score_alone(config: Config, texts: Sequence[str], reviews: int, batch: int) -> dict[str, Any]:
    """``reviews`` texts through ``config.workers`` threads, each on its own replica of the default model."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if config.tokenizer_pool else "false"
    try:
        first = OnnxScorer.load(DEFAULT_MODEL_DIR, intra_op_threads=config.intra_op_threads)
        scorers = [first] + [first.replica() for _ in range(config.workers - 1)]
        sample = [texts[i % len(texts)] for i in range(reviews)]
        work: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        for start in range(0, len(sample), batch):
            work.put(sample[start : start + batch])
        for scorer in scorers:
            scorer.predict(sample[:batch])  # warm: first-run allocations are not the steady state
        started, cpu, busy = time.perf_counter(), time.process_time(), busy_seconds()
        threads = [threading.Thread(target=_drain, args=(scorer, work)) for scorer in scorers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall, cpu, busy = time.perf_counter() - started, time.process_time() - cpu, busy_seconds() - busy
    finally:
        _restore("TOKENIZERS_PARALLELISM", previous)
    return {
        "config": config.name,
        "batch": batch,
        "per_s": reviews / wall,
        "cpu_us_per_review": cpu / reviews * 1e6,
        "cores": cpu / wall,
        "other_processes_cores": max(0.0, (busy - cpu) / wall),
        "load_average_1m": load(),
    }


def _drain(scorer: OnnxScorer, work: queue.SimpleQueue[list[str]]) -> None:
    while True:
        try:
            batch = work.get_nowait()
        except queue.Empty:
            return
        scorer.predict(batch)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def sweep(texts: Sequence[str], reviews: int) -> list[dict[str, Any]]:
    results = []
    for config in CONFIGS:
        for batch in BATCHES:
            result = score_alone(config, texts, reviews, batch) | {"workers": config.workers}
            result |= {"intra_op_threads": config.intra_op_threads, "tokenizer_pool": config.tokenizer_pool}
            console.print(
                f"  scorer alone, {config.name}, batch {batch}: {result['per_s']:,.0f}/s, "
                f"{result['cpu_us_per_review']:.0f} us CPU/review, load {result['load_average_1m']}"
            )
            results.append(result)
    return results


def service(topics: Topics, source: str, count: int) -> dict[str, Any]:
    """``shunt run`` with default settings over the whole topic (see ops.bench.throughput.service_run)."""
    run = service_run(topics, source, count, Variant("default", {}), "compare")
    return run | {"load_average_1m": load()}


def peer(topics: Topics, source: str, count: int) -> dict[str, Any]:
    """The Quix Streams app over the whole topic; its rates, CPU per review and the broker's."""
    output = topics.make("quix-out", 1, LOG_APPEND)
    group = f"bench-quix-{uuid.uuid4().hex[:6]}"
    args = peer_quix.command(topics.bootstrap, source, output, count, group)
    with Child("compare-quix", args, peer_quix.env()) as child:
        sampler = Sampler(child.pid, broker_pid(topics.bootstrap)).start()
        try:
            wait_for(lambda: child.proc.poll() is not None or outputs_in(topics.bootstrap, output) >= count, 1800, 1)
            child.terminate(30)
        finally:
            sampler.stop()
    records = read_outputs(topics.bootstrap, output)
    if not records:
        raise RuntimeError(f"the Quix Streams peer wrote nothing:\n{child.log_tail()}")
    rates = throughput(records, child.started_ms)
    cpu = cpu_per_review(sampler, sorted(r.append_ms for r in records))
    topics.delete([output])
    return {
        "throughput": rates.as_dict(),
        "steady_cpu": cpu,
        "broker_cores": round(sampler.broker_cores(), 2),
        "other_processes_cores": round(sampler.others_cores(), 2),
        "peak_rss_mb": round(sampler.peak_rss() / 2**20, 1),
        "load_average_1m": load(),
    }


def kafka_alone(topics: Topics, source: str, count: int) -> dict[str, Any]:
    started, busy = time.perf_counter(), busy_seconds()
    result = passthrough(topics, source, count, Settings())
    wall = time.perf_counter() - started
    return result | {"machine_cores": (busy_seconds() - busy) / wall, "load_average_1m": load()}


def ceiling_of(scores: list[dict[str, Any]]) -> dict[str, Any]:
    return max(scores, key=lambda s: s["per_s"])


def summarise(
    scores: list[dict[str, Any]], run: dict[str, Any], quix: dict[str, Any] | None, kafka: dict[str, Any]
) -> dict[str, Any]:
    ceiling = ceiling_of(scores)
    rate = run["throughput"]["steady_per_s"]
    cpu = run["steady_cpu"]["service_us_per_review"] if run["steady_cpu"] else float("nan")
    quix_rate = quix["throughput"]["steady_per_s"] if quix else None
    paired = [s for s in scores if s.get("pair")]  # the best configuration just before and after the service
    paired_rate = sum(s["per_s"] for s in paired) / len(paired)
    return {
        "ceiling": ceiling,
        "service_per_s": rate,
        "service_share_of_ceiling": rate / ceiling["per_s"],
        "paired_ceiling_per_s": paired_rate,
        "paired_other_processes_cores": max(s["other_processes_cores"] for s in paired),
        "service_share_of_paired": rate / paired_rate,
        "service_cpu_us_per_review": cpu,
        "service_cpu_vs_scorer": cpu / ceiling["cpu_us_per_review"],
        "peer_per_s": quix_rate,
        "service_vs_peer": rate / quix_rate if quix_rate else None,
        "passthrough_per_s": rate_of(kafka),
        "goals": {
            f"service >= {GOAL_SHARE} of the ceiling": rate / ceiling["per_s"] >= GOAL_SHARE,
            f"service CPU/review <= {GOAL_CPU}x the scorer's": cpu / ceiling["cpu_us_per_review"] <= GOAL_CPU,
            f"service >= {GOAL_PEER}x the peer": bool(quix_rate) and rate / quix_rate >= GOAL_PEER,
        },
    }


def _cpu(result: dict[str, Any]) -> tuple[str, str]:
    steady = result.get("steady_cpu")
    if not steady:
        return "-", "-"
    return f"{steady['service_us_per_review']:.0f}", f"{steady['broker_us_per_review']:.0f}"


def render(summary: dict[str, Any], run: dict[str, Any], quix: dict[str, Any] | None, kafka: dict[str, Any]) -> None:
    ceiling = summary["ceiling"]
    best = ceiling["per_s"]
    rows = [
        (
            "service: shunt run, default settings",
            f"{summary['service_per_s']:,.0f}",
            f"{summary['service_share_of_ceiling']:.2f}",
            *_cpu(run),
            f"{run['other_processes_cores']:.2f}",
            f"{run['load_average_1m']}",
        ),
        (
            f"ceiling: scorer alone ({ceiling['config']}, batch {ceiling['batch']})",
            f"{best:,.0f}",
            "1.00",
            f"{ceiling['cpu_us_per_review']:.0f}",
            "",
            f"{ceiling['other_processes_cores']:.2f}",
            f"{ceiling['load_average_1m']}",
        ),
    ]
    if quix:
        rows.append(
            (
                "peer: Quix Streams, apply(score) per message",
                f"{summary['peer_per_s']:,.0f}",
                f"{summary['peer_per_s'] / best:.2f}",
                *_cpu(quix),
                f"{quix['other_processes_cores']:.2f}",
                f"{quix['load_average_1m']}",
            )
        )
    rows.append(
        (
            "passthrough: confluent-kafka, no model",
            f"{summary['passthrough_per_s']:,.0f}",
            f"{summary['passthrough_per_s'] / best:.1f}",
            f"{kafka['client_cpu_us_per_review']:.0f} (clients)",
            "",
            "",
            f"{kafka['load_average_1m']}",
        )
    )
    columns = ["", "reviews/s", "/ ceiling", "CPU us/review", "broker us/review", "others' cores", "load 1m"]
    table("service / ceiling / peer / passthrough (one run, one broker)", columns, rows)
    ratio = summary["service_vs_peer"]
    console.print(
        f"paired: the ceiling's configuration just before and after the service ran at "
        f"{summary['paired_ceiling_per_s']:,.0f}/s (others up to {summary['paired_other_processes_cores']:.2f} cores): "
        f"service {summary['service_share_of_paired']:.2f} of it"
    )
    console.print(
        f"service CPU/review {summary['service_cpu_vs_scorer']:.2f}x the scorer's; "
        f"service {'-' if ratio is None else f'{ratio:.1f}x'} the peer"
    )
    for goal, met in summary["goals"].items():
        console.print(f"  {'met   ' if met else 'MISSED'} {goal}")


@click.command()
@click.option("--reviews", type=click.IntRange(min=1_000), default=100_000, show_default=True)
@click.option(
    "--bootstrap", help="Kafka HOST:PORT (default: KAFKA_BOOTSTRAP, else the project broker, else start one)."
)
@click.option("--partitions", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--scorer-reviews", type=click.IntRange(min=1_024), default=16_384, show_default=True)
@click.option("--peer/--no-peer", default=True, show_default=True, help="Run the Quix Streams peer.")
@click.option("--profile/--no-profile", default=False, show_default=True, help="One more service run under py-spy.")
@click.option("--out", default="compare", show_default=True, help="Writes .bench/<out>.json.")
def main(**options: Any) -> None:
    """Print service / ceiling / peer / passthrough, measured in one run against one broker."""
    texts, text_source = review_texts()
    env, started, count = machine(), time.monotonic(), options["reviews"]
    with broker(options["bootstrap"]) as kafka, Topics(kafka.bootstrap, run_id()) as topics:
        source = topics.make("in", options["partitions"])
        produce_s = produce_backlog(kafka.bootstrap, source, texts, count, options["partitions"])
        console.print(f"{count:,} reviews on {options['partitions']} partitions in {produce_s:.1f}s; ceiling sweep")
        scores = sweep(texts, options["scorer_reviews"])
        best = ceiling_of(scores)
        config = next(c for c in CONFIGS if c.name == best["config"])
        scores.append(score_alone(config, texts, options["scorer_reviews"], best["batch"]) | {"pair": "before"})
        console.print("service (shunt run, default settings)")
        run = service(topics, source, count)
        scores.append(score_alone(config, texts, options["scorer_reviews"], best["batch"]) | {"pair": "after"})
        console.print("peer (Quix Streams)" if options["peer"] else "peer skipped")
        quix = peer(topics, source, count) if options["peer"] else None
        console.print("passthrough (confluent-kafka)")
        pass_run = kafka_alone(topics, source, count)
        profiled = None
        if options["profile"]:
            profiled = profile_run(topics, source, count, Variant("default", {}), run["throughput"]["steady_per_s"])
    summary = summarise(scores, run, quix, pass_run)
    render(summary, run, quix, pass_run)
    if profiled:
        show(profiled)
    write_json(
        options["out"],
        {
            "machine": env | {"load_average_1m_end": load()},
            "reviews": count,
            "partitions": options["partitions"],
            **texts_record(texts, text_source),
            "produce_seconds": round(produce_s, 1),
            "total_seconds": round(time.monotonic() - started, 1),
            "summary": summary,
            "scorer": scores,
            "service": run,
            "peer": quix,
            "passthrough": pass_run,
            "profile": profiled,
        },
    )


if __name__ == "__main__":
    main()
