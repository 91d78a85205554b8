"""The whole of ``shunt eval`` but the terminal: score the reviews, gather the answers, write answers.jsonl,
the plots and report.json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from consumer.config import Settings
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


def evaluate(
    settings: Settings,
    data: Path,
    out: Path,
    *,
    thresholds: Sequence[float],
    cost_cap: float | None,
    source: Mapping[str, Path | None],
    bar: ProgressBar,
) -> dict[str, Any]:
    """The whole evaluation; returns the report it wrote to ``out``. ``bar`` shows the live questions."""
    cases = score_reviews(load_reviews(data), settings)
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
    plot_tradeoff(out / TRADEOFF_PLOT, report)
    plot_reliability(out / RELIABILITY_PLOT, report)
    (out / REPORT_FILE).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report
