"""The JSON report of ``shunt eval``: every method at every threshold, the choices per goal, the recommended
threshold, the small model's calibration, and where the answers came from."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from consumer.config import LlmConfig, Settings
from consumer.offline import selective
from consumer.offline.evaluation.arithmetic import (
    METHOD_NAMES,
    Item,
    Method,
    Point,
    labels_of,
    llm_alone,
    small_alone,
    sweep,
)
from consumer.offline.evaluation.asking import Gathered
from consumer.offline.evaluation.cases import Ask, Case
from consumer.offline.evaluation.thresholds import GOALS, Choice, choices, recommended
from consumer.small.calibration import Bin, expected_calibration_error, reliability

REPORT_VERSION = 1
ANSWERS_FILE = "answers.jsonl"
REPORT_FILE = "report.json"
TRADEOFF_PLOT = "tradeoff.png"
RELIABILITY_PLOT = "reliability.png"
SERVICE_METHOD: Method = "ds_plus"  # the service asks with the S4L prompt, so its threshold is DS+'s


def point_json(point: Point) -> dict[str, Any]:
    """A point as plain data (the method's display name added)."""
    return {**asdict(point), "name": METHOD_NAMES[point.method]}


def choice_json(choice: Choice) -> dict[str, Any]:
    """A choice as plain data."""
    return {
        "goal": choice.goal,
        "description": GOALS[choice.goal],
        "method": choice.method,
        "threshold": choice.point.threshold if choice.point else None,
        "point": point_json(choice.point) if choice.point else None,
        "toml": choice.toml,
        "env": choice.env,
    }


def calibration_json(
    bins: Sequence[Bin], plot: str, confidences: Sequence[float] = (), correct: Sequence[bool] = ()
) -> dict[str, Any]:
    """The reliability diagram's numbers and where it was drawn; with the per-review confidences and
    correctness, also the small model's selective accuracy by coverage and its AURC."""
    out: dict[str, Any] = {
        "bins": len(bins),
        "ece": expected_calibration_error(bins),
        "plot": plot,
        "table": [asdict(b) for b in bins],
    }
    if len(confidences):
        out["aurc"] = selective.aurc(confidences, correct)
        out["selective_accuracy"] = selective.selective_accuracy(confidences, correct)
    return out


def sweep_json(swept: Mapping[Method, Sequence[Point]]) -> list[dict[str, Any]]:
    """One row per threshold with both methods side by side."""
    return [
        {"threshold": ds.threshold, "ds": point_json(ds), "ds_plus": point_json(plus)}
        for ds, plus in zip(swept["ds"], swept["ds_plus"], strict=True)
    ]


def build_report(
    items: Sequence[Item],
    cases: Sequence[Case],
    asks: Sequence[Ask],
    gathered: Gathered,
    *,
    settings: Settings,
    thresholds: Sequence[float],
    cost_cap: float | None,
    data: Path,
    source: Mapping[str, Path | None],
) -> dict[str, Any]:
    """The report document: what was evaluated, where the answers came from, and every result."""
    return {
        "report_version": REPORT_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": {"path": str(data), "reviews": len(cases), "labels": labels_of(items)},
        "small_model": {"path": str(settings.model.path), "version": cases[0].scored.prediction.model_version},
        "llm": _llm_meta(settings.llm, asks, source),
        "answers": _answers_meta(asks, gathered),
        "thresholds": list(thresholds),
        "cost_cap": cost_cap,
        **_results(items, thresholds, cost_cap),
        "plots": {"tradeoff": TRADEOFF_PLOT, "reliability": RELIABILITY_PLOT},
    }


def _llm_meta(llm: LlmConfig, asks: Sequence[Ask], source: Mapping[str, Path | None]) -> dict[str, Any]:
    replay, cache = source.get("replay"), source.get("cache")
    return {
        "model": llm.model,
        "source": "replay" if replay is not None else "live",
        "base_url": None if replay is not None else llm.base_url,
        "replay": None if replay is None else str(replay),
        "cache": None if cache is None else str(cache),
        "prompt_versions": {ask.kind: ask.prompt.version for ask in asks},
        "price_per_mtok": llm.price().model_dump(),
    }


def _answers_meta(asks: Sequence[Ask], gathered: Gathered) -> dict[str, Any]:
    records = gathered.records
    return {
        "file": ANSWERS_FILE,
        "plain": sum(1 for ask in asks if ask.kind == "plain"),
        "s4l": sum(1 for ask in asks if ask.kind == "s4l"),
        "questions": len({ask.key for ask in asks}),
        "from_cache": gathered.from_cache,
        "fetched": gathered.fetched,
        "failed": sum(1 for record in records.values() if record.label is None),
        "spent_usd": gathered.spent_usd,
    }


def _results(items: Sequence[Item], thresholds: Sequence[float], cost_cap: float | None) -> dict[str, Any]:
    llm = llm_alone(items)
    swept = sweep(items, thresholds)
    found = {method: choices(swept[method], method, llm.accuracy, cost_cap) for method in swept}
    confidences, correct = [i.confidence for i in items], [i.small == i.truth for i in items]
    bins = reliability(confidences, correct)
    return {
        "small_alone": point_json(small_alone(items)),
        "llm_alone": point_json(llm),
        "sweep": sweep_json(swept),
        "choices": {method: [choice_json(c) for c in chosen] for method, chosen in found.items()},
        "recommended": choice_json(recommended(found[SERVICE_METHOD], cost_cap)),
        "calibration": calibration_json(bins, RELIABILITY_PLOT, confidences, correct),
    }
