"""Benchmark 4: scale-out, 1 vs 2 service processes in one consumer group on a 4-partition topic.

    .venv/bin/python -m ops.bench.scaleout [--reviews 200000] [--bootstrap HOST:PORT] [--repeats 3] [--pinned]

Pre-produces ``--reviews`` typical reviews once. Then, ``--repeats`` times and in turn: one service
process, and two processes started together in one group (the cooperative-sticky assignor gives each two
partitions after the second joins). Each configuration reads the whole topic with a fresh group and
fresh output topic (threshold 0, small path); when every review is out the processes are stopped with
SIGTERM. Throughput is first output to last output (broker LogAppendTime), as in benchmark 1; outputs
and unique ids are both counted (a rebalance may repeat a little, at-least-once). ``--pinned`` adds a
third configuration: two processes with one compute thread each (ONNX Runtime intra-op 1, tokenizers not
parallel), so the two do not fight over the two cores with four compute threads.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import click

from ops.bench.broker import broker, broker_pid
from ops.bench.children import Child, start_service, wait_for
from ops.bench.data import produce_backlog, review_texts, texts_record
from ops.bench.outputs import outputs_in, read_outputs, throughput
from ops.bench.report import console, machine, median, table, write_json
from ops.bench.sampling import Sampler
from ops.bench.topics import Topics, run_id

PARTITIONS = 4
ONE_THREAD = {"SHUNT_MODEL__INTRA_OP_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Config:
    """How many processes, and extra environment for each."""

    name: str
    processes: int
    env: dict[str, str]


def run(topics: Topics, source: str, count: int, config: Config, label: str) -> dict[str, Any]:
    """Start ``config.processes`` services in one group; stop them when ``count`` outputs are in."""
    settings: dict[str, Any] = topics.for_service(label) | {
        "topics__input": source,
        "kafka__group_id": f"bench-{label}-{uuid.uuid4().hex[:6]}",
        "router__threshold": 0,
    }
    output = settings["topics__output"]
    children: list[Child] = []
    samplers: list[Sampler] = []
    try:
        for n in range(config.processes):
            children.append(start_service(f"scaleout-{label}-p{n}", topics.bootstrap, settings, config.env))
            samplers.append(Sampler(children[-1].pid, broker_pid(topics.bootstrap)).start())
        wait_for(lambda: _outputs(topics.bootstrap, output, children) >= count, 900, 1.0)
    finally:
        for sampler in samplers:
            sampler.stop()
        for child in children:
            child.terminate()
    rates = throughput(read_outputs(topics.bootstrap, output), min(c.started_ms for c in children))
    topics.delete_outputs(settings)
    service_cores = sum(s.mean_cpu() for s in samplers) / 100
    others = max(0.0, samplers[0].machine_cores() - service_cores - samplers[0].broker_cores())
    return {
        "throughput": rates.as_dict(),
        "service_cores": round(service_cores, 2),
        "broker_cores": round(samplers[0].broker_cores(), 2),
        "other_processes_cores": round(others, 2),
        "peak_rss_mb_per_process": [round(s.peak_rss() / 2**20, 1) for s in samplers],
    }


def _outputs(bootstrap: str, topic: str, children: list[Child]) -> int:
    for child in children:
        if child.proc.poll() is not None:
            raise RuntimeError(f"a service exited early:\n{child.log_tail()}")
    return outputs_in(bootstrap, topic)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    base = median([r["throughput"]["steady_per_s"] for r in runs["1 process"]])
    out = {}
    for name, results in runs.items():
        steady = median([r["throughput"]["steady_per_s"] for r in results])
        out[name] = {
            "steady_per_s": steady,
            "wall_per_s": median([r["throughput"]["wall_per_s"] for r in results]),
            "speedup": steady / base,
            "duplicates": median([r["throughput"]["outputs"] - r["throughput"]["unique"] for r in results]),
            "service_cores": median([r["service_cores"] for r in results]),
            "broker_cores": median([r["broker_cores"] for r in results]),
            "other_processes_cores": median([r["other_processes_cores"] for r in results]),
        }
    return out


def render(summary: dict[str, Any], repeats: int) -> None:
    rows = [
        (
            name,
            f"{s['steady_per_s']:,.0f}",
            f"{s['wall_per_s']:,.0f}",
            f"{s['speedup']:.2f}x",
            f"{s['service_cores']:.2f}",
            f"{s['broker_cores']:.2f}",
            f"{s['other_processes_cores']:.2f}",
            f"{s['duplicates']:.0f}",
        )
        for name, s in summary.items()
    ]
    columns = ["configuration", "steady/s", "wall/s", "speed-up", "service cores", "broker", "others", "duplicates"]
    table(f"scale-out on {PARTITIONS} partitions, small path (median of {repeats})", columns, rows)


@click.command()
@click.option("--reviews", type=click.IntRange(min=1_000), default=200_000, show_default=True)
@click.option("--bootstrap", help="Kafka HOST:PORT (default: KAFKA_BOOTSTRAP, else the project broker).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--pinned/--no-pinned", default=False, show_default=True, help="Add 2 processes x 1 thread.")
@click.option("--out", default="scaleout", show_default=True)
def main(**options: Any) -> None:
    """Throughput of one service process against two in the same group."""
    configs = [Config("1 process", 1, {}), Config("2 processes", 2, {})]
    if options["pinned"]:
        configs.append(Config("2 processes, 1 compute thread each", 2, ONE_THREAD))
    texts, text_source = review_texts()
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    with broker(options["bootstrap"]) as kafka, Topics(kafka.bootstrap, run_id()) as topics:
        source = topics.make("scale-in", PARTITIONS)
        produce_backlog(kafka.bootstrap, source, texts, options["reviews"], PARTITIONS)
        for n in range(options["repeats"]):
            for i, config in enumerate(configs):
                console.print(f"repeat {n + 1}: {config.name}")
                runs[config.name].append(run(topics, source, options["reviews"], config, f"scale{i}-r{n}"))
                console.print(f"  {runs[config.name][-1]['throughput']['steady_per_s']:,.0f} reviews/s")
    summary = summarise(runs)
    render(summary, options["repeats"])
    write_json(
        options["out"],
        {
            "machine": machine(),
            **texts_record(texts, text_source),
            "options": options,
            "configs": {c.name: {"processes": c.processes, "env": c.env} for c in configs},
            "summary": summary,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
