"""``shunt top``: a live view of the metrics topic, refreshing in place.

All instances of the matching groups are shown together: their latest totals are summed (an instance id
that restarted keeps its earlier runs' totals). Throughput, latency, lag and breaker come from the latest
window of each live instance (one that has not said ``final`` and has published recently). The arithmetic
is :class:`consumer.observe.summary.Fleet`; this module holds the flags and the drawing.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table

from consumer.commands.common import config_option
from consumer.commands.render import number, percent, usd
from consumer.commands.report import metrics_reader, parse_duration, reader_settings, summary_view
from consumer.observe.reading import MetricsReader
from consumer.observe.summary import Fleet, shunt_share, window_rate


def instances_table(fleet: Fleet, now_ms: int) -> Table:
    table = Table("instance", "group", "state", "seq", "reviews/s", "labeled", "shunt", "spend", "breaker", "lag")
    for key, m in sorted(fleet.latest.items()):
        t = m["totals"]
        table.add_row(
            key,
            m["group_id"],
            fleet.state(m, now_ms),
            str(m["seq"]),
            number(window_rate(m)),
            f"{t['labeled']:,}",
            percent(shunt_share(t)),
            usd(t["cost_usd"], 6),
            m["breaker_state"],
            f"{sum(m['lag'].values()):,}",
        )
    return table


def _agreement(block: dict[str, Any]) -> str:
    interval = block["agreement"]
    if interval["estimate"] is None:
        return "-"
    return (
        f"{percent(interval['estimate'])} [{percent(interval['low'])}, {percent(interval['high'])}] n={interval['n']}"
    )


def loop_table(fleet: Fleet) -> Table:
    """The closed loop now: tau in force, agreement with the LLM (window and cumulative), alarm, rates."""
    columns = ("instance", "tau", "routed now", "pending", "labels/s", "agreement (window)", "agreement (all)",
               "drift", "spend/h", "audit/h", "savings/h", "budget")  # fmt: skip
    table = Table(*columns, title="closed loop")
    for key, m in sorted(fleet.latest.items()):
        loop, now = m.get("loop"), m.get("now")
        if loop is None or now is None:
            continue
        budget = loop["budget"]
        cap = "-" if budget is None else f"{budget['pressure']:.0%} of {usd(budget['usd_per_hour'], 2)}/h"
        table.add_row(
            key, f"{loop['threshold']:.3f}", percent(now["routed_share"]), str(now["llm_pending"]),
            number(now["labeled_per_s"]), _agreement(loop["window"]), _agreement(loop["totals"]),
            "ALARM" if loop["drift_alarm"] else "ok", usd(now["cost_usd_per_hour"], 4),
            usd(now["audit_cost_usd_per_hour"], 4), usd(now["savings_usd_per_hour"], 4), cap,
        )  # fmt: skip
    return table


def render(fleet: Fleet, topic: str, group_filter: str) -> Group:
    now_ms = time.time_ns() // 1_000_000
    summary = fleet.summary(now_ms)
    live = len(fleet.live(now_ms))
    stamp = time.strftime("%H:%M:%S")
    title = f"shunt top  {topic}  groups {group_filter}  instances {live} live / {len(fleet.latest)}  {stamp}"
    parts: list[RenderableType] = [summary_view(summary, title), instances_table(fleet, now_ms)]
    if any(m.get("loop") for m in fleet.latest.values()):  # the closed-loop table only when there is a loop
        parts.append(loop_table(fleet))
    return Group(*parts)


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
    fleet, console = Fleet(), Console()
    # Ctrl-C is how a live view ends.
    with contextlib.suppress(KeyboardInterrupt), metrics_reader(settings, since_ms, group_filter) as reader:
        for message in reader.read_all():
            fleet.add(message)
        if once:
            console.print(render(fleet, reader.topic, group_filter))
            return
        with Live(render(fleet, reader.topic, group_filter), console=console, auto_refresh=False) as view:
            _follow(reader, fleet, view, duration, max(refresh, 0.05))
