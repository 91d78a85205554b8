"""``shunt eval --max-error``: the risk-controlled threshold from labelled data (consumer.stream.risk's rule),
with what it would send to the LLM and how DS+ does at it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consumer.offline.evaluation.arithmetic import Point
from consumer.offline.evaluation.cases import Case
from consumer.stream.risk import RiskChoice, risk_threshold


def risk_choice(cases: Sequence[Case], max_error: float, risk_confidence: float) -> RiskChoice:
    """The lowest tau whose Clopper–Pearson upper bound on the small path's error is at most ``max_error``."""
    confidences = [case.scored.prediction.confidence for case in cases]
    correct = [case.scored.prediction.label == case.truth for case in cases]
    return risk_threshold(confidences, correct, max_error, risk_confidence)


def with_risk_threshold(thresholds: Sequence[float], choice: RiskChoice | None) -> tuple[float, ...]:
    """The sweep's thresholds, with the certified tau among them (so DS and DS+ are evaluated at it)."""
    if choice is None or choice.threshold is None:
        return tuple(thresholds)
    return tuple(sorted({*thresholds, choice.threshold}))


def risk_json(choice: RiskChoice, max_error: float, risk_confidence: float, at_tau: Point | None) -> dict[str, Any]:
    """The risk section of report.json."""
    return {
        "max_error": max_error,
        "risk_confidence": risk_confidence,
        "method": "fixed-sequence testing from tau=1 down, Clopper-Pearson upper bound per tau",
        "threshold": choice.threshold,
        "upper_bound": choice.upper_bound,
        "kept": choice.kept,
        "errors": choice.errors,
        "reviews": choice.total,
        "small_path_error": choice.errors / choice.kept if choice.kept else None,
        "share_to_llm": choice.share_to_llm,
        "ds_plus": None if at_tau is None else {"accuracy": at_tau.accuracy, "cost_ratio": at_tau.cost_ratio},
        "env": None if choice.threshold is None else f"SHUNT_ROUTER__THRESHOLD={float(choice.threshold)!r}",
    }
