"""``shunt top``: a live view of the metrics topic, refreshing in place.

All instances of the matching groups are shown together: their latest totals are summed (an instance id
that restarted keeps its earlier runs' totals). Throughput, latency, lag and breaker come from the latest
window of each live instance (one that has not said ``final`` and has published recently).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from consumer.commands.common import config_option
from consumer.commands.report import (
    LatencyMix,
    MetricsReader,
    Summary,
    add_counts,
    configs,
    merged_lag,
    money,
    number,
    parse_duration,
    percent,
    reader_settings,
    summary_view,
    worst_breaker,
    zero_counts,
)
from consumer.observe.meter import ratio

_STALE_WINDOWS = 3
_MIN_STALE_MS = 30_000


def _window_s(message: dict[str, Any]) -> float:
    span_ms: int = message["window_end_ms"] - message["window_start_ms"]
    return max(span_ms, 1) / 1000


class Fleet:
    """The latest message of each instance id, and the totals of its earlier runs."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self._retired: dict[str, dict[str, Any]] = {}
        self.messages = 0

    def add(self, message: dict[str, Any]) -> None:
        self.messages += 1
        key = message["instance_id"]
        previous = self.latest.get(key)
        if previous is not None and message["seq"] <= previous["seq"]:
            # The same instance id started again from seq 0: keep what its earlier run counted.
            self._retired[key] = add_counts(self._retired.get(key) or zero_counts(), previous["totals"])
        self.latest[key] = message

    def state(self, message: dict[str, Any], now_ms: int) -> str:
        """``final``, ``live``, or ``stale`` (silent for several windows)."""
        if message["final"]:
            return "final"
        stale_ms = max(_STALE_WINDOWS * _window_s(message) * 1000, _MIN_STALE_MS)
        return "live" if now_ms - message["window_end_ms"] <= stale_ms else "stale"

    def live(self, now_ms: int) -> list[dict[str, Any]]:
        return [m for m in self.latest.values() if self.state(m, now_ms) == "live"]

    def summary(self, now_ms: int) -> Summary:
        counts = zero_counts()
        for totals in [m["totals"] for m in self.latest.values()] + list(self._retired.values()):
            add_counts(counts, totals)
        live = self.live(now_ms)
        latency = LatencyMix()
        for message in live:
            latency.add(message["latency_ms"])
        return Summary(
            counts=counts,
            seconds=None,
            reviews_per_s=sum(m["window"]["reviews_in"] / _window_s(m) for m in live) if live else None,
            latency=latency.result(),
            lag=merged_lag(live),
            breaker_state=worst_breaker(m["breaker_state"] for m in live),
            instances=sorted(self.latest),
            groups=sorted({m["group_id"] for m in self.latest.values()}),
            messages=self.messages,
            configs=configs(self.latest.values()),
        )


def instances_table(fleet: Fleet, now_ms: int) -> Table:
    table = Table("instance", "group", "state", "seq", "reviews/s", "labeled", "shunt", "spend", "breaker", "lag")
    for key, m in sorted(fleet.latest.items()):
        t = m["totals"]
        table.add_row(
            key,
            m["group_id"],
            fleet.state(m, now_ms),
            str(m["seq"]),
            number(m["window"]["reviews_in"] / _window_s(m)),
            f"{t['labeled']:,}",
            percent(ratio(t["large"] + t["fallback"], t["labeled"])),
            money(t["cost_usd"]),
            m["breaker_state"],
            f"{sum(m['lag'].values()):,}",
        )
    return table


def render(fleet: Fleet, topic: str, group_filter: str) -> Group:
    now_ms = time.time_ns() // 1_000_000
    summary = fleet.summary(now_ms)
    live = len(fleet.live(now_ms))
    stamp = time.strftime("%H:%M:%S")
    title = f"shunt top  {topic}  groups {group_filter}  instances {live} live / {len(fleet.latest)}  {stamp}"
    return Group(summary_view(summary, title), instances_table(fleet, now_ms))


def _follow(reader: MetricsReader, fleet: Fleet, view: Live, duration_s: float | None, refresh_s: float) -> None:
    deadline = None if duration_s is None else time.monotonic() + duration_s
    next_draw = 0.0
    while deadline is None or time.monotonic() < deadline:
        for message in reader.poll(min(0.25, refresh_s)):
            fleet.add(message)
        if time.monotonic() >= next_draw:
            view.update(render(fleet, reader.topic, reader.group_filter), refresh=True)
            next_draw = time.monotonic() + refresh_s


@click.command(name="top")
@config_option
@click.option("--bootstrap", help="Kafka bootstrap servers HOST:PORT[,...] (kafka.bootstrap_servers).")
@click.option("--topic", help="Metrics topic (topics.metrics).")
@click.option("--group-filter", default="*", show_default=True, help="Consumer group ids to include (glob).")
@click.option("--since", help="Only read messages newer than this (90s, 30m, 1h); default: the whole topic.")
@click.option("--once", is_flag=True, help="Read what is on the topic, print one view and exit.")
@click.option("--duration", type=float, help="Exit after this many seconds.")
@click.option("--refresh", type=float, default=1.0, show_default=True, help="Seconds between redraws.")
def command(
    config_path: Path | None,
    bootstrap: str | None,
    topic: str | None,
    group_filter: str,
    since: str | None,
    once: bool,
    duration: float | None,
    refresh: float,
) -> None:
    """Live view of the metrics topic: throughput, shunt rate, spend, baseline, savings, latency, lag, breaker.

    Ctrl-C exits."""
    settings = reader_settings(config_path, bootstrap, topic)
    since_ms = None if since is None else time.time_ns() // 1_000_000 - int(parse_duration(since) * 1000)
    reader = MetricsReader(settings, since_ms, group_filter)
    fleet, console = Fleet(), Console()
    try:
        for message in reader.read_all():
            fleet.add(message)
        if once:
            console.print(render(fleet, reader.topic, group_filter))
            return
        with Live(render(fleet, reader.topic, group_filter), console=console, auto_refresh=False) as view:
            _follow(reader, fleet, view, duration, max(refresh, 0.05))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view ends
    finally:
        reader.close()
