"""``shunt report``: a one-shot summary of the metrics topic, for humans (a table) and scripts (``--json``).

The summary adds up the *windows* published since ``--since`` (read from the offset that
``offsets_for_times`` gives for that moment), so it is exactly what the stream did in that period. The
reading and the arithmetic live in ``consumer.observe`` (``reading``, ``summary``); this module holds the
flags and the rendering, which ``shunt top`` shares.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console, Group
from rich.table import Table

from consumer.commands.common import config_option, prune, settings_from
from consumer.commands.render import number, percent, usd
from consumer.config import Settings
from consumer.kafka.reader import TopicReadError
from consumer.observe.meter import LATENCY_PATHS
from consumer.observe.reading import MetricsReader
from consumer.observe.summary import Period, Summary

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``45s``, ``30m``, ``1h``, ``2d``."""
    match = _DURATION.match(text)
    if match is None:
        raise click.BadParameter(f"expected a duration like 90s, 30m, 1h or 2d, got {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def headline_rows(s: Summary) -> list[tuple[str, str]]:
    """The rows both ``top`` and ``report`` print, in order."""
    data, c = s.as_json(), s.counts
    savings_pct = data["savings_pct"]
    return [
        ("throughput", f"{number(s.reviews_per_s)} reviews/s"),
        ("reviews", f"{c['reviews_in']:,} in, {c['labeled']:,} labeled, {c['dlq']:,} dlq"),
        ("decided by", f"small {c['small']:,}, large {c['large']:,}, fallback {c['fallback']:,}"),
        ("shunt rate", percent(data["shunt_rate"])),
        ("spend", usd(c["cost_usd"], 6)),
        ("baseline", usd(c["baseline_cost_usd"], 6)),
        ("savings", f"{usd(s.savings_usd, 6)} ({'-' if savings_pct is None else f'{savings_pct:.1f}%'})"),
        ("cost ratio", percent(data["cost_ratio"])),
        ("llm", _llm_row(c)),
        ("lag", f"{data['lag_total']:,} ({len(s.lag)} partitions)"),
        ("breaker", s.breaker_state or "-"),
        ("config", "; ".join(s.configs) or "-"),
    ]


def _llm_row(c: Mapping[str, Any]) -> str:
    return (
        f"requests {c['llm_requests']:,}, retries {c['llm_retries']:,}, 429s {c['llm_429s']:,}, "
        f"errors {c['llm_errors']:,}, cache hits {c['cache_hits']:,}, "
        f"tokens {c['prompt_tokens']:,}+{c['completion_tokens']:,}"
    )


def latency_table(latency: Mapping[str, Mapping[str, Any]]) -> Table:
    table = Table("latency ms", "count", "p50", "p95", "p99", title=None, expand=False)
    for path in LATENCY_PATHS:
        row = latency.get(path, {"count": 0, "p50": None, "p95": None, "p99": None})
        table.add_row(path, f"{row['count']:,}", *(number(row[q]) for q in ("p50", "p95", "p99")))
    return table


def summary_view(s: Summary, title: str) -> Group:
    head = Table(show_header=False, title=title, title_justify="left", expand=False)
    head.add_column(style="bold")
    head.add_column()
    for name, value in headline_rows(s):
        head.add_row(name, value)
    return Group(head, latency_table(s.latency))


def reader_settings(config_path: Path | None, bootstrap: str | None, topic: str | None) -> Settings:
    overrides = prune({"kafka": {"bootstrap_servers": bootstrap}, "topics": {"metrics": topic}})
    return settings_from(config_path, overrides)


@contextlib.contextmanager
def metrics_reader(settings: Settings, since_ms: int | None, group_filter: str) -> Iterator[MetricsReader]:
    """The metrics topic's reader, closed on exit; a topic that cannot be read is a one-line error."""
    try:
        with MetricsReader.from_settings(settings, since_ms, group_filter) as reader:
            yield reader
    except TopicReadError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command(name="report")
@config_option
@click.option("--bootstrap", help="Kafka bootstrap servers HOST:PORT[,...] (kafka.bootstrap_servers).")
@click.option("--topic", help="Metrics topic (topics.metrics).")
@click.option("--since", "since", default="1h", show_default=True, help="Period to summarise: 90s, 30m, 1h, 2d.")
@click.option("--group-filter", default="*", show_default=True, help="Consumer group ids to include (glob).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def command(
    config_path: Path | None, bootstrap: str | None, topic: str | None, since: str, group_filter: str, as_json: bool
) -> None:
    """Summarise the metrics topic over the last --since: reviews, shunt rate, spend, baseline, savings.

    Adds up the windows every instance published in the period (exact for the period, whatever restarted)."""
    seconds = parse_duration(since)
    settings = reader_settings(config_path, bootstrap, topic)
    until_ms = time.time_ns() // 1_000_000
    since_ms = until_ms - int(seconds * 1000)
    period = Period()
    with metrics_reader(settings, since_ms, group_filter) as reader:
        for message in reader.read_all():
            period.add(message)
    summary = period.summary()
    summary.extra = {"topic": reader.topic, "since_ms": since_ms, "until_ms": until_ms, "skipped": reader.skipped}
    if as_json:
        click.echo(orjson.dumps(summary.as_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        Console().print(summary_view(summary, f"{reader.topic}: last {since} ({summary.messages} windows)"))
