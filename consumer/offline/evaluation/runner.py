"""The whole of ``shunt eval`` but the terminal: score the reviews, gather the answers, write answers.jsonl,
the plots and report.json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from consumer.config import Settings
from consumer.offline.evaluation.arithmetic import Point
from consumer.offline.evaluation.asking import ProgressBar, gather, items_of, replayed, write_answers
from consumer.offline.evaluation.cases import load_reviews, make_asks, score_reviews
from consumer.offline.evaluation.plots import plot_reliability, plot_tradeoff
from consumer.offline.evaluation.report import (
    ANSWERS_FILE,
    RELIABILITY_PLOT,
    REPORT_FILE,
    TRADEOFF_PLOT,
    build_report,
)
from consumer.offline.evaluation.risk import risk_choice, risk_json, with_risk_threshold


def evaluate(
    settings: Settings,
    data: Path,
    out: Path,
    *,
    thresholds: Sequence[float],
    cost_cap: float | None,
    source: Mapping[str, Path | None],
    bar: ProgressBar,
    risk: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """The whole evaluation; returns the report it wrote to ``out``. ``bar`` shows the live questions.

    ``risk`` = (max_error, risk_confidence) adds the risk-controlled threshold (and sweeps at it)."""
    cases = score_reviews(load_reviews(data), settings)
    chosen = risk_choice(cases, *risk) if risk is not None else None
    thresholds = with_risk_threshold(thresholds, chosen)
    asks = make_asks(cases, settings.llm, max(thresholds))
    replay = source.get("replay")
    gathered = replayed(cases, asks, replay, settings.llm) if replay else gather(asks, cases, settings, source, bar)
    out.mkdir(parents=True, exist_ok=True)
    write_answers(out / ANSWERS_FILE, cases, asks, gathered)
    items = items_of(cases, gathered, settings.llm)
    report = build_report(
        items,
        cases,
        asks,
        gathered,
        settings=settings,
        thresholds=thresholds,
        cost_cap=cost_cap,
        data=data,
        source=source,
    )
    if risk is not None and chosen is not None:
        report["risk"] = risk_json(chosen, *risk, at_tau=_ds_plus_at(report, chosen.threshold))
    plot_tradeoff(out / TRADEOFF_PLOT, report)
    plot_reliability(out / RELIABILITY_PLOT, report)
    (out / REPORT_FILE).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report


def _ds_plus_at(report: Mapping[str, Any], tau: float | None) -> Point | None:
    row = next((r for r in report["sweep"] if tau is not None and r["threshold"] == tau), None)
    if row is None:
        return None
    fields = {k: v for k, v in row["ds_plus"].items() if k != "name"}
    return Point(**fields)
