"""``shunt eval``: on labelled reviews, what each threshold gains and what it costs, and which one to set.

This module parses the flags and draws the tables and the progress bar; :mod:`consumer.offline.evaluation`
does the rest (the data, the small model's predictions, the LLM's answers from a replay file, a cache or a
live endpoint through the service's own :class:`~consumer.llm.pool.LlmPool`, report.json, answers.jsonl and
two plots).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from consumer.commands.common import config_option, prune, settings_from
from consumer.commands.render import percent
from consumer.offline import evaluation as ev
from consumer.offline.evaluation import ANSWERS_FILE, RELIABILITY_PLOT, REPORT_FILE, TRADEOFF_PLOT, Tick


def _thresholds(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...]:
    if value is None:
        return ev.DEFAULT_THRESHOLDS
    try:
        return ev.parse_thresholds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _cost_cap(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    if value.strip().lower() == "none":
        return None
    try:
        cap = float(value)
    except ValueError:
        raise click.BadParameter(f"a ratio such as 0.31, or none; got {value!r}") from None
    if not 0.0 <= cap <= 1.0:
        raise click.BadParameter(f"a ratio of the LLM alone's cost, between 0 and 1; got {cap:g}")
    return cap


@click.command(name="eval")
@config_option
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Labelled reviews: JSON lines {"id"?, "text", "label"}.')  # fmt: skip
@click.option("--llm-url", help="OpenAI-compatible base URL to ask live (llm.base_url).")
@click.option("--llm-model", help="Model name sent to the endpoint; also picks the price (llm.model).")
@click.option("--replay", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Recorded answers instead of a live LLM: JSON lines {"id"|"text", "label", "prompt"?}.')  # fmt: skip
@click.option("--cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Answers of earlier runs, read first; every answer fetched live is appended to it.")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/eval"),
              show_default=True, help="Folder for report.json, answers.jsonl and the plots.")  # fmt: skip
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Small model folder (model.path).")  # fmt: skip
@click.option("--thresholds", callback=_thresholds, metavar="X,Y,...",
              help="Thresholds to sweep (default: 0, then 0.5..1 by 0.01).")  # fmt: skip
@click.option("--cost-cap", callback=_cost_cap, metavar="RATIO|none", default=str(ev.DEFAULT_COST_CAP),
              show_default=True,
              help="Recommend the most accurate threshold costing at most RATIO of the LLM alone (the default is "
                   "the paper's DS+ operating point); none: recommend the cheapest threshold at least as accurate "
                   "as the LLM alone.")  # fmt: skip
@click.option("--max-error", type=click.FloatRange(0, 1, min_open=True), metavar="E",
              help="Also find the risk-controlled threshold: the lowest tau whose upper confidence bound on the "
                   "small path's error is at most E (router.max_error).")  # fmt: skip
@click.option("--risk-confidence", type=click.FloatRange(0.5, 1, max_open=True), default=0.95, show_default=True,
              help="Confidence of that bound (router.risk_confidence).")  # fmt: skip
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="Log threshold (logs go to stderr).")  # fmt: skip
def command(
    config_path: Path | None,
    data: Path,
    llm_url: str | None,
    llm_model: str | None,
    replay: Path | None,
    cache: Path | None,
    out: Path,
    model_dir: Path | None,
    thresholds: tuple[float, ...],
    cost_cap: float | None,
    max_error: float | None,
    risk_confidence: float,
    log_level: str,
) -> None:
    """Compare the small model alone, the LLM alone, DS and DS+ on labelled reviews across thresholds.

    Reports accuracy, macro-F1, the share sent to the LLM and the cost (USD and ratio to the LLM alone),
    chooses a threshold per goal and prints the config to set it. The LLM is asked once per review and
    prompt kind (live through the service's own pool, limits and prompts; or from --replay / --cache).
    """
    if replay is not None and (llm_url is not None or cache is not None):
        raise click.UsageError("--replay replaces the live LLM: give it without --llm-url and --cache")
    overrides = prune(
        {
            "llm": {"base_url": llm_url, "model": llm_model},
            "model": {"path": model_dir},
            "service": {"log_level": log_level},
        }
    )
    settings = settings_from(config_path, overrides)
    ev.check_price(settings.llm)
    source = {"replay": replay} if replay is not None else {"cache": cache}
    console = Console()
    risk = (max_error, risk_confidence) if max_error is not None else None
    report = ev.evaluate(
        settings, data, out, thresholds=thresholds, cost_cap=cost_cap, source=source, bar=_bar, risk=risk
    )
    _print(console, report, out)


@contextlib.contextmanager
def _bar(description: str, total: int) -> Iterator[Tick]:
    """A progress bar on stderr; the value advances it by one."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    )  # fmt: skip
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def _print(console: Console, report: Mapping[str, Any], out: Path) -> None:
    console.print(_baselines_table(report))
    console.print(_sweep_table(report))
    console.print(_choices_table(report))
    _print_selective(console, report["calibration"])
    pick = report["recommended"]
    if pick["point"] is None:
        console.print("[yellow]No swept threshold meets the goal; see the table above.[/]")
    else:
        goal = ev.GOALS[pick["goal"]]
        if pick["goal"] == "cost_cap":
            goal += f" ({percent(report['cost_cap'])} of the LLM alone; --cost-cap sets it)"
        console.print(f"Set it ({pick['point']['name']}, {goal}):")
        console.print(pick["toml"], markup=False, highlight=False)
        console.print(f"or  {pick['env']}", markup=False, highlight=False)
    if "risk" in report:
        _print_risk(console, report["risk"])
    answers = report["answers"]
    if answers["failed"]:
        retry = (
            "record them again live" if report["llm"]["source"] == "replay" else "rerun with --cache to ask only them"
        )
        console.print(
            f"[yellow]{answers['failed']} question(s) have no LLM answer (DS/DS+ keep the small label, the LLM "
            f"alone counts them wrong); {retry}.[/]"
        )
    console.print(f"Wrote {out / REPORT_FILE}, {out / ANSWERS_FILE}, {out / TRADEOFF_PLOT}, {out / RELIABILITY_PLOT}")


def _baselines_table(report: Mapping[str, Any]) -> Table:
    data, llm, answers = report["data"], report["llm"], report["answers"]
    model = report["small_model"]["version"]
    title = f"{data['reviews']} reviews · small model {model} · LLM {llm['model']} ({llm['source']})"
    caption = (
        f"{answers['questions']} LLM questions: {answers['from_cache']} from the cache, {answers['fetched']} asked "
        f"now (${answers['spent_usd']:.4f}), {answers['failed']} failed"
    )
    table = Table(title=title, caption=caption)
    for name in ("method", "accuracy", "macro-F1", "to LLM", "cost (USD)", "cost ratio"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for point in (report["small_alone"], report["llm_alone"]):
        figures = (f"{point['macro_f1']:.4f}", percent(point["llm_share"]), f"{point['cost_usd']:.4f}")
        table.add_row(point["name"], percent(point["accuracy"], 2), *figures, percent(point["cost_ratio"]))
    return table


# Beyond this many thresholds the console shows a readable subset; report.json always has every one.
_SWEEP_ROWS = 25


def _sweep_table(report: Mapping[str, Any]) -> Table:
    rows = report["sweep"]
    shown = _shown_rows(report)
    caption = None if len(shown) == len(rows) else f"{len(shown)} of {len(rows)} thresholds; report.json has all"
    title = "DS (plain prompt) and DS+ (S4L prompt) by threshold; cost is the ratio to the LLM alone"
    table = Table(title=title, caption=caption)
    for name in ("threshold", "to LLM", "DS acc", "DS F1", "DS cost", "DS+ acc", "DS+ F1", "DS+ cost"):
        table.add_column(name, justify="right")
    llm_accuracy = report["llm_alone"]["accuracy"]
    chosen = report["recommended"]["threshold"]
    for row in shown:
        ds, plus = row["ds"], row["ds_plus"]
        cells = [f"{row['threshold']:g}", percent(ds["llm_share"])]
        for point in (ds, plus):
            accent = "green" if point["accuracy"] >= llm_accuracy else ""  # at least as accurate as the LLM alone
            cells += [f"[{accent}]{percent(point['accuracy'], 2)}[/]" if accent else percent(point["accuracy"], 2),
                      f"{point['macro_f1']:.4f}", percent(point["cost_ratio"])]  # fmt: skip
        table.add_row(*cells, style="bold" if row["threshold"] == chosen else None)
    return table


def _shown_rows(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every row of a short sweep; of a long one, every 0.05, every 0.01 from 0.9, and each chosen threshold."""
    rows = report["sweep"]
    if len(rows) <= _SWEEP_ROWS:
        return list(rows)
    chosen = {c["threshold"] for picks in report["choices"].values() for c in picks if c["point"] is not None}
    return [
        row
        for row in rows
        if row["threshold"] in chosen or row["threshold"] >= 0.9 or round(row["threshold"] * 100) % 5 == 0
    ]


def _choices_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Threshold by goal (bold in the sweep: the recommended one)")
    for name in ("goal", "method", "threshold", "accuracy", "cost ratio"):
        table.add_column(name, justify="left" if name in ("goal", "method") else "right")
    for method, chosen in report["choices"].items():
        for choice in chosen:
            point = choice["point"]
            if point is None:
                table.add_row(choice["description"], ev.METHOD_NAMES[method], "none", "-", "-")
                continue
            table.add_row(choice["description"], point["name"], f"{point['threshold']:g}",
                          percent(point["accuracy"], 2), percent(point["cost_ratio"]))  # fmt: skip
    return table


def _print_selective(console: Console, calibration: Mapping[str, Any]) -> None:
    if "selective_accuracy" not in calibration:
        return
    curve = ", ".join(f"{c['coverage']:.0%} {percent(c['accuracy'])}" for c in calibration["selective_accuracy"])
    console.print(
        f"Small model, accuracy on the share it keeps (most confident first): {curve}; "
        f"AURC {calibration['aurc']:.4f}, ECE {percent(calibration['ece'], 2)}"
    )


def _print_risk(console: Console, risk: Mapping[str, Any]) -> None:
    level = f"{risk['max_error']:g} at {percent(risk['risk_confidence'], 0)} confidence"
    if risk["threshold"] is None:
        console.print(f"[yellow]Risk rule ({level}): no threshold certified; every review would go to the LLM.[/]")
        return
    console.print(
        f"Risk rule ({level}): tau = {risk['threshold']:g}, upper bound on the small path's error "
        f"{risk['upper_bound']:.4f} ({risk['errors']} wrong of {risk['kept']} kept), "
        f"{percent(risk['share_to_llm'])} to the LLM"
    )
    console.print(risk["env"], markup=False, highlight=False)
