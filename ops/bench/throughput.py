"""Benchmark 1: end-to-end throughput of the small-model path through the real Kafka, beside its two ceilings.

    .venv/bin/python -m ops.bench.throughput [--reviews 200000] [--bootstrap HOST:PORT] [--repeats 3]
        [--variant NAME:KEY=VALUE[;KEY=VALUE...]]... [--no-profile] [--profile-variant NAME]

Pre-produces ``--reviews`` typical reviews (the shared Amazon texts cycled with unique ids) to a topic with
4 partitions, once. Then, ``--repeats`` times, all in the same run:

1. the scorer alone in memory (tokenise + ONNX + softmax, one process) at batch sizes 32-256;
2. a plain confluent-kafka consume -> produce passthrough of the same topic, same client settings;
3. the service (``python -m consumer run``, threshold 0: small path only) reading the whole topic with a
   fresh consumer group and stopping by itself (``max_messages``), once per ``--variant`` (configuration
   given as environment variables, e.g. ``b256:SHUNT_MODEL__BATCH_SIZE=256``; ``default`` always runs),
   each run followed by
   the scorer alone again at the best batch size, so every service run is paired with the scorer measured
   just before and just after it.

Rates come from the broker's LogAppendTime of the outputs: "steady" is first output to last output,
"wall" is process start (imports, model load, group join included) to last output. Other people's work
on this 2-core machine moves every wall-clock rate, so the machine's busy CPU is sampled throughout:
a pair is "quiet" when other processes kept under 0.25 cores busy, and the CPU cost per review (service
process, and the broker beside it) is reported too, which moves much less with the load. The table shows
medians over the repeats; ``--profile`` adds one more run under py-spy (see profiling.py).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import click

from consumer.config import Settings
from ops.bench.broker import broker, broker_pid
from ops.bench.ceilings import load_default_scorer, passthrough, rate_of, scorer_rates
from ops.bench.children import parse_env_pairs, start_service, wait_for
from ops.bench.data import produce_backlog, review_texts, texts_record
from ops.bench.outputs import outputs_in, read_outputs, throughput
from ops.bench.profiling import profile, show
from ops.bench.report import console, machine, median, table, write_json
from ops.bench.sampling import Sampler, cpu_per_review
from ops.bench.topics import Topics, run_id

BATCH_SIZES = (32, 64, 128, 256)
TARGET_RATE = 3_000
TARGET_SHARE = 0.80
PROFILE_SECONDS = 15
QUIET_CORES = 0.25  # a pair is quiet when no one else kept more than this busy


@dataclass(frozen=True)
class Variant:
    """A named service configuration: SHUNT_ environment variables on top of the defaults."""

    name: str
    env: dict[str, str]


def parse_variant(text: str) -> Variant:
    """``NAME:KEY=VALUE;KEY=VALUE`` (``;`` because librdkafka JSON settings hold commas)."""
    name, _, pairs = text.partition(":")
    return Variant(name, parse_env_pairs([p for p in pairs.split(";") if p]))


def service_settings(topics: Topics, source: str, label: str, count: int) -> dict[str, Any]:
    """The service's settings for one run: fresh output topics and group, small path only, stop at ``count``."""
    return topics.for_service(label) | {
        "topics__input": source,
        "kafka__group_id": f"bench-{label}-{uuid.uuid4().hex[:6]}",
        "router__threshold": 0,
        "service__max_messages": count,
        "service__idle_timeout_s": 60,
    }


def service_run(topics: Topics, source: str, count: int, variant: Variant, label: str) -> dict[str, Any]:
    """One service run over the whole topic; its rates, peak RSS, CPU and per-thread CPU seconds."""
    settings = service_settings(topics, source, label, count)
    with start_service(f"throughput-{label}", topics.bootstrap, settings, variant.env) as child:
        sampler = Sampler(child.pid, broker_pid(topics.bootstrap)).start()
        try:
            code = child.wait(timeout_s=900)
        finally:
            sampler.stop()
        if code != 0:
            raise RuntimeError(f"service exited {code}:\n{child.log_tail()}")
    records = read_outputs(topics.bootstrap, settings["topics__output"])
    rates = throughput(records, child.started_ms)
    cpu = cpu_per_review(sampler, sorted(r.append_ms for r in records))
    topics.delete_outputs(settings)
    return {
        "throughput": rates.as_dict(),
        "peak_rss_mb": round(sampler.peak_rss() / 2**20, 1),
        "mean_cpu_percent": round(sampler.mean_cpu(), 1),
        "broker_cores": round(sampler.broker_cores(), 2),
        "other_processes_cores": round(sampler.others_cores(), 2),
        "steady_cpu": cpu,
    }


def profile_run(topics: Topics, source: str, count: int, variant: Variant, rate: float | None = None) -> dict[str, Any]:
    """One more run of ``variant``, sampled by py-spy once outputs flow; not in the medians. With ``rate``
    (the variant's measured reviews/s) the window ends well before the run does: a window that outlives the
    work dilutes every share with shutdown and reads the threads' CPU after the scoring threads are gone."""
    settings = service_settings(topics, source, "profile", count)
    output = settings["topics__output"]
    flowing = min(5_000, count // 10)  # past start-up, well before the end
    seconds = PROFILE_SECONDS if rate is None else profile_seconds(count - flowing, rate)
    with start_service("throughput-profile", topics.bootstrap, settings, variant.env) as child:
        wait_for(lambda: outputs_in(topics.bootstrap, output) > flowing, 120, 0.5)
        result = profile(child.pid, seconds)
        child.wait(timeout_s=900)
    topics.delete_outputs(settings)
    return result | {"variant": variant.name}


def profile_seconds(remaining: int, rate: float) -> int:
    """A py-spy window inside the rest of a run: 60% of the time ``remaining`` reviews take at ``rate``."""
    return max(2, min(PROFILE_SECONDS, int(0.6 * remaining / rate)))


def one_repeat(
    topics: Topics, source: str, options: dict[str, Any], scorer: Any, texts: list[str], n: int
) -> dict[str, Any]:
    """The scorer at every batch size, the Kafka passthrough, then each service variant followed by the
    scorer again at the best batch size: each service run is paired with the mean of the scorer just
    before and just after it, so a burst of someone else's load is less likely to hit only one side."""
    count, reviews = options["reviews"], options["scorer_reviews"]
    console.print(f"repeat {n + 1}: scorer alone, batch sizes {BATCH_SIZES}")
    sweep = scorer_rates(scorer, texts, reviews, BATCH_SIZES)
    best = max(sweep, key=lambda size: sweep[size]["per_s"])
    console.print(f"repeat {n + 1}: passthrough")
    pass_run = passthrough(topics, source, count, Settings())
    before, services = sweep[best], {}
    for variant in options["variants"]:
        console.print(f"repeat {n + 1}: service ({variant.name})")
        run = service_run(topics, source, count, variant, f"{variant.name}-r{n}")
        after = scorer_rates(scorer, texts, reviews, (best,))[best]
        services[variant.name] = run | pair(run, before, after)
        before = after
        console.print(
            f"  {run['throughput']['steady_per_s']:,.0f} reviews/s, {services[variant.name]['pair_ratio']:.2f} "
            f"of the scorer ({services[variant.name]['pair_ceiling_per_s']:,.0f}/s), "
            f"others {services[variant.name]['pair_other_cores']:.2f} cores"
        )
    return {"scorer": sweep, "best_batch": best, "passthrough": pass_run, "service": services}


def pair(run: dict[str, Any], before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The service run against the scorer measured around it; quiet when no one else used much CPU."""
    ceiling = (before["per_s"] + after["per_s"]) / 2
    others = max(run["other_processes_cores"], before["other_processes_cores"], after["other_processes_cores"])
    scorer_cpu = (before["cpu_us_per_review"] + after["cpu_us_per_review"]) / 2
    steady_cpu = run["steady_cpu"]["service_us_per_review"] if run["steady_cpu"] else float("nan")
    return {
        "pair_ceiling_per_s": ceiling,
        "pair_ratio": run["throughput"]["steady_per_s"] / ceiling,
        "pair_other_cores": others,
        "pair_quiet": others < QUIET_CORES,
        "pair_cpu_efficiency": scorer_cpu / steady_cpu,
    }


def summarise_runs(repeats: list[dict[str, Any]], variants: list[Variant]) -> dict[str, Any]:
    """Medians over the repeats, the paired ratios to the scorer, the ratio to Kafka, and the targets."""
    best = [r["scorer"][r["best_batch"]] for r in repeats]
    out: dict[str, Any] = {
        "scorer_best_per_s": median([b["per_s"] for b in best]),
        "scorer_best_cpu_us_per_review": median([b["cpu_us_per_review"] for b in best]),
        "scorer_best_cores": median([b["cores"] for b in best]),
        "scorer_best_batch": [r["best_batch"] for r in repeats],
        "scorer_by_batch_per_s": {b: median([r["scorer"][b]["per_s"] for r in repeats]) for b in BATCH_SIZES},
        "passthrough_per_s": median([rate_of(r["passthrough"]) for r in repeats]),
        "passthrough_client_cpu_us_per_review": median([r["passthrough"]["client_cpu_us_per_review"] for r in repeats]),
        "service": {},
    }
    for variant in variants:
        out["service"][variant.name] = variant_summary([r["service"][variant.name] for r in repeats], variant, out)
    return out


def variant_summary(runs: list[dict[str, Any]], variant: Variant, ceilings: dict[str, Any]) -> dict[str, Any]:
    steady = median([run["throughput"]["steady_per_s"] for run in runs])
    quiet = [run["pair_ratio"] for run in runs if run["pair_quiet"]]
    ratio = median([run["pair_ratio"] for run in runs])
    return {
        "env": variant.env,
        "steady_per_s": steady,
        "wall_per_s": median([run["throughput"]["wall_per_s"] for run in runs]),
        "share_of_scorer_paired": ratio,
        "share_of_scorer_quiet_pairs": median(quiet) if quiet else None,
        "quiet_pairs": len(quiet),
        "cpu_efficiency_vs_scorer": median([run["pair_cpu_efficiency"] for run in runs]),
        "share_of_passthrough": steady / ceilings["passthrough_per_s"],
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "mean_cpu_percent": median([run["mean_cpu_percent"] for run in runs]),
        "broker_cores": median([run["broker_cores"] for run in runs]),
        "other_processes_cores": median([run["pair_other_cores"] for run in runs]),
        "steady_cpu_us_per_review": median(_steady(runs, "service_us_per_review")),
        "steady_broker_us_per_review": median(_steady(runs, "broker_us_per_review")),
        "steady_service_cores": median(_steady(runs, "service_cores")),
        "meets_80pct_of_scorer": ratio >= TARGET_SHARE,
        "meets_3000_per_s": steady >= TARGET_RATE,
    }


def _steady(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [run["steady_cpu"][key] for run in runs if run["steady_cpu"]]


def render(summary: dict[str, Any], repeats: int) -> None:
    rows = [
        (
            f"scorer alone, in memory (best batch {summary['scorer_best_batch']})",
            f"{summary['scorer_best_per_s']:,.0f}",
            "1.00",
            "",
            "-",
            f"{summary['scorer_best_cpu_us_per_review']:.0f}",
            f"{summary['scorer_best_cores']:.2f}",
        ),
        (
            "Kafka passthrough, no model",
            f"{summary['passthrough_per_s']:,.0f}",
            "-",
            "",
            "1.00",
            f"{summary['passthrough_client_cpu_us_per_review']:.0f} (clients)",
            "",
        ),
    ]
    for name, s in summary["service"].items():
        quiet = s["share_of_scorer_quiet_pairs"]
        rows.append(
            (
                f"service ({name}); wall incl. start {s['wall_per_s']:,.0f}/s",
                f"{s['steady_per_s']:,.0f}",
                f"{s['share_of_scorer_paired']:.2f}",
                "-" if quiet is None else f"{quiet:.2f} (n={s['quiet_pairs']})",
                f"{s['share_of_passthrough']:.3f}",
                f"{s['steady_cpu_us_per_review']:.0f} (+{s['steady_broker_us_per_review']:.0f} broker)",
                f"{s['steady_service_cores']:.2f}",
            )
        )
    columns = ["path", "reviews/s", "/scorer paired", "/scorer quiet", "/kafka", "CPU us/review", "cores"]
    table(f"small-path throughput (median of {repeats} repeats)", columns, rows)
    for name, s in summary["service"].items():
        console.print(
            f"service ({name}): CPU efficiency vs the scorer alone {s['cpu_efficiency_vs_scorer']:.2f}; "
            f"other processes {s['other_processes_cores']:.2f} cores; broker {s['broker_cores']:.2f} cores; "
            f"peak RSS {s['peak_rss_mb']:.0f} MB"
        )


@click.command()
@click.option("--reviews", type=click.IntRange(min=1_000), default=200_000, show_default=True)
@click.option("--bootstrap", help="Kafka HOST:PORT (default: KAFKA_BOOTSTRAP, else the project broker).")
@click.option("--partitions", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--scorer-reviews", type=click.IntRange(min=256), default=16_384, show_default=True)
@click.option("--variant", "variant_specs", multiple=True, help="NAME:KEY=VALUE[;KEY=VALUE...]; repeatable.")
@click.option("--profile/--no-profile", default=True, show_default=True, help="One more run under py-spy.")
@click.option("--profile-variant", default="default", show_default=True, help="Which variant to profile.")
@click.option("--out", default="throughput", show_default=True, help="Writes .bench/<out>.json.")
def main(**options: Any) -> None:
    """Measure small-path throughput next to the scorer-alone and Kafka-passthrough ceilings."""
    options["variants"] = [Variant("default", {})] + [parse_variant(v) for v in options["variant_specs"]]
    texts, text_source = review_texts()
    env = machine()
    started = time.monotonic()
    with broker(options["bootstrap"]) as kafka, Topics(kafka.bootstrap, run_id()) as topics:
        source = topics.make("in", options["partitions"])
        produce_s = produce_backlog(kafka.bootstrap, source, texts, options["reviews"], options["partitions"])
        scorer = load_default_scorer()
        repeats = [one_repeat(topics, source, options, scorer, texts, n) for n in range(options["repeats"])]
        profiled = None
        if options["profile"]:
            chosen = [v for v in options["variants"] if v.name == options["profile_variant"]]
            if not chosen:
                raise SystemExit(f"--profile-variant {options['profile_variant']!r} is not one of the variants")
            console.print(f"profiling the service ({chosen[0].name}) with py-spy")
            profiled = profile_run(topics, source, options["reviews"], chosen[0])
    summary = summarise_runs(repeats, options["variants"])
    render(summary, options["repeats"])
    if profiled:
        show(profiled)
    env |= {"load_average_1m_end": round(os.getloadavg()[0], 2)}
    write_json(
        options["out"],
        {
            "machine": env,
            "reviews": options["reviews"],
            "partitions": options["partitions"],
            **texts_record(texts, text_source),
            "produce_seconds": round(produce_s, 1),
            "total_seconds": round(time.monotonic() - started, 1),
            "summary": summary,
            "repeats": repeats,
            "profile": profiled,
        },
    )


if __name__ == "__main__":
    main()
