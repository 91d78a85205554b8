"""``shunt demo``: the whole pipeline on an embedded broker, with live progress and a cost summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from consumer import logs
from consumer.commands.render import percent, usd
from consumer.sandbox.demo import DemoOptions, Snapshot, Summary, run_demo
from consumer.sandbox.standin import parse_latency

_OVERFLOW_RPM = 120


def _latency(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, float]:
    try:
        return parse_latency(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(name="demo")
@click.option("--bootstrap", metavar="HOST:PORT", help="Use this Kafka instead of starting the embedded broker.")
@click.option("--reviews", type=click.IntRange(min=2), help="Reviews in the stream.  [default: 2000; 300 with --small]")
@click.option("--rate", type=click.FloatRange(min=0), help="Reviews per second; 0: as fast as possible.  "
              "[default: 40; 100 with --small]")  # fmt: skip
@click.option("--threshold", type=click.FloatRange(0, 1), help="The small model decides at or above this confidence "
              "(default: the service's router.threshold).")  # fmt: skip
@click.option("--llm-accuracy", type=click.FloatRange(0, 1), default=0.96, show_default=True,
              help="The stand-in LLM's accuracy on ordinary reviews.")  # fmt: skip
@click.option("--llm-hard-accuracy", type=click.FloatRange(0, 1), default=0.80, show_default=True,
              help="Its accuracy on the hard (mixed or sarcastic) ones.")  # fmt: skip
@click.option("--llm-latency-ms", default="150-600", show_default=True, callback=_latency, metavar="LO-HI",
              help="The stand-in's answer latency, uniform in LO-HI milliseconds.")  # fmt: skip
@click.option("--llm-rpm", type=click.IntRange(min=1), default=900, show_default=True,
              help="The stand-in's requests/minute limit (the service is configured to respect it).")  # fmt: skip
@click.option("--lane", type=click.Choice(["online", "batch", "overflow"]), default="online", show_default=True,
              help="llm.lane: the online pool, the Batch API at half price, or online until its backlog is full "
                   "and then the Batch API (a small backlog; 120 RPM unless --llm-rpm is given).")  # fmt: skip
@click.option("--batch-turnaround-s", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long the stand-in's Batch API takes to finish a batch.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the reviews and the stand-in.")
@click.option("--drift", is_flag=True, help="The closed loop: the stream turns hard halfway; audits watch the small "
              "model, the drift alarm fires and the risk rule raises tau.")  # fmt: skip
@click.option(
    "--budget",
    "budget_usd_per_hour",
    type=click.FloatRange(min=0, min_open=True),
    metavar="USD_PER_HOUR",
    help="The closed loop: cap the LLM spend at this rate; the cap lowers tau, then takes the fallback.",
)
@click.option("--small", is_flag=True, help="A CI-sized run: 300 reviews at 100/s.")
@click.option("--summary-json", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the summary as JSON to this file.")  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, help="Show the service's info logs (stderr).")
def command(small: bool, summary_json: Path | None, verbose: bool, **given: Any) -> None:
    """Run the whole thing on one machine and show what it cost.

    Starts a Kafka-protocol broker (Tansu, embedded: no Java, no Docker) unless --bootstrap is given, the
    stand-in LLM (an oracle that is right --llm-accuracy of the time, with latency and a rate limit), a
    stream of synthetic reviews with known labels, and the service itself. Ends with accuracy against the
    true labels (small model only, LLM only, the shunt), the LLM spend, what sending every review to the
    LLM would have cost, and latency. Ctrl-C stops early (within seconds) and still summarises.
    """
    level = "info" if verbose else "warning"
    logs.configure(level, "auto")
    given = {key: value for key, value in given.items() if value is not None} | {"log_level": level}
    ctx = click.get_current_context()
    if given["lane"] == "overflow" and ctx.get_parameter_source("llm_rpm") is click.core.ParameterSource.DEFAULT:
        given["llm_rpm"] = _OVERFLOW_RPM  # far below the uncertain rate, so the overflow shows
    options = DemoOptions.small(**given) if small else DemoOptions(**given)
    console = Console()
    with Live(console=console, auto_refresh=False, transient=False) as live:
        summary = run_demo(options, _LiveView(live))
    console.line()
    console.print(render_summary(summary))
    if summary_json is not None:
        summary_json.write_bytes(orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")


class _LiveView:
    """Renders each snapshot into the live area."""

    def __init__(self, live: Live) -> None:
        self._live = live

    def progress(self, snapshot: Snapshot) -> None:
        self._live.update(render_progress(snapshot), refresh=True)


def render_progress(s: Snapshot) -> Group:
    """The live view: two bars, the routing split and the money so far."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(justify="right", style="bold")
    grid.add_column()
    grid.add_column(justify="right")
    grid.add_row("produced", ProgressBar(total=s.total, completed=s.produced, width=40), f"{s.produced}/{s.total}")
    grid.add_row("labelled", ProgressBar(total=s.total, completed=s.labelled, width=40), f"{s.labelled}/{s.total}")
    to_llm = s.llm / s.labelled if s.labelled else None
    grid.add_row("routed", f"small model {s.small}   LLM {s.llm} ({percent(to_llm)})   DLQ {s.dlq}", "")
    saved = 1 - s.spend_usd / s.baseline_usd if s.baseline_usd > 0 else None
    grid.add_row("spend", f"{usd(s.spend_usd)} of {usd(s.baseline_usd)} all-LLM baseline (saved {percent(saved)})", "")
    batch = f", {s.by_batch} answered by the Batch API" if s.by_batch else ""
    grid.add_row("LLM", f"{s.llm_requests} requests, {s.llm_429s} answered 429{batch}", f"{s.elapsed_s:5.1f} s")
    return Group(Text(f"shunt demo: {s.phase}", style="bold cyan"), grid)


def _latency_row(latency: dict[str, dict[str, Any]], path: str) -> str:
    stats = latency.get(path)
    if not stats or stats.get("p50") is None:
        return "-"
    return f"p50 {stats['p50']:.0f}  p95 {stats['p95']:.0f}  p99 {stats['p99']:.0f}  (n={stats['count']})"


def render_summary(s: Summary) -> Table:
    """The summary table, with how each number was made."""
    title = "shunt demo: summary" + (" (interrupted)" if s.interrupted else "")
    table = Table(title=title, show_header=False, title_justify="left", min_width=78)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for label, value in _summary_rows(s):
        table.add_row(label, value)
    if not s.complete:
        table.add_row("warning", "not every output was read back in time; the numbers cover those that were")
    return table


def _loop_rows(loop: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The closed loop at the end: tau in force, agreement with the LLM on audits, the alarm, the cap."""
    if loop is None or (not loop["totals"]["audits"] and loop["budget"] is None):
        return []
    totals, a = loop["totals"], loop["totals"]["agreement"]
    agreement = (
        "-" if a["estimate"] is None else f"{percent(a['estimate'])} [{percent(a['low'])}, {percent(a['high'])}]"
    )
    rows = [
        ("closed loop", f"tau {loop['threshold']} ({loop['mode']}, {totals['threshold_changes']} changes); drift alarm "
                        f"{'FIRING' if loop['drift_alarm'] else 'quiet'}"),
        ("audits", f"{totals['audits']} shadow requests ({usd(totals['audit_cost_usd'])}), agreement {agreement}"),
    ]  # fmt: skip
    if (budget := loop["budget"]) is not None:
        rows.append(("spend cap", f"{usd(budget['usd_per_hour'])}/h: {totals['budget_fallbacks']} budget fallbacks, "
                                  f"tau allowed by the cap {budget['threshold']:.3f}"))  # fmt: skip
    return rows


def _summary_rows(s: Summary) -> list[tuple[str, str]]:
    acc, m = s.accuracy, s.money
    source = "the service's metrics topic" if m.source == "metrics" else "the outputs, priced like the service's meter"
    if m.source == "metrics":
        audits = f" with the audits' {usd(m.audit_usd)}" if m.audit_usd else ""
        source += f"; the outputs' cost_usd{audits} add up to {usd(m.outputs_spend_usd)}"
    llm_note = f"stand-in oracle, {percent(s.llm_accuracy[0], 0)} / {percent(s.llm_accuracy[1], 0)} on hard reviews"
    checked = f"{s.llm_as_predicted}/{s.llm_checked} online answers matched the offline oracle"
    return [
        ("reviews", f"{s.labelled} labelled of {s.reviews} ({s.produced} produced, {s.dlq} dead-lettered)"),
        ("small model", f"{s.small} decided alone (threshold {s.threshold}, model {s.model_version})"),
        (
            "sent to the LLM",
            f"{s.large + s.fallback} = {percent(s.share_to_llm)}  ({s.llm_cached} answered from the "
            f"service's cache, {s.fallback} fell back to the small label)",
        ),
        ("accuracy: small only", percent(acc["small"])),
        ("accuracy: LLM only", f"{percent(acc['llm'])}  ({llm_note}; {checked})"),
        ("accuracy: the shunt", percent(acc["shunt"])),
        ("LLM spend", f"{usd(m.spend_usd)}  ({source})"),
        *_loop_rows(s.loop),
        ("all-LLM baseline", f"{usd(m.baseline_usd)}  (had every review gone to the LLM)"),
        ("saved", f"{usd(m.savings_usd)}  (paid {percent(m.cost_ratio)} of the baseline)"),
        ("latency ms, all", _latency_row(s.latency_ms, "all")),
        ("latency ms, small", _latency_row(s.latency_ms, "small")),
        ("latency ms, LLM", _latency_row(s.latency_ms, "large")),
        (
            "LLM calls",
            f"{s.llm_requests} requests, {s.llm_429s} answered 429; at most {s.llm_peak_per_minute} "
            f"in any 60 s (limit {s.llm_rpm}/min)",
        ),
        *_lane_rows(s),
        ("broker", s.broker),
        ("wall time", f"{s.wall_s:.1f} s"),
    ]


def _lane_rows(s: Summary) -> list[tuple[str, str]]:
    if s.lane == "online":
        return []
    online, batch = s.lanes.get("online", 0), s.lanes.get("batch", 0)
    return [("lanes", f"llm.lane = {s.lane}: {online} answered online, {batch} by {s.batches} batches at half price")]
