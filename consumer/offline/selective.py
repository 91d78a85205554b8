"""Selective accuracy: how accurate the small model is on the share of reviews it keeps (its most confident
ones, as routing keeps them), and the area under the risk-coverage curve (AURC), routing's figure of merit.
Both depend only on how the confidence ranks the reviews, not on its calibration."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SELECTIVE_COVERAGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _ranked(confidences: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidences, dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    return conf[order], np.asarray(correct, dtype=bool)[order]


def aurc(confidences: Sequence[float], correct: Sequence[bool]) -> float:
    """The mean over k of the error rate among the k most confident reviews (lower is better; NaN if none)."""
    _conf, right = _ranked(confidences, correct)
    if not len(right):
        return float("nan")
    return float((1.0 - np.cumsum(right) / np.arange(1, len(right) + 1)).mean())


def selective_accuracy(
    confidences: Sequence[float], correct: Sequence[bool], coverages: Sequence[float] = SELECTIVE_COVERAGES
) -> list[dict[str, float]]:
    """Accuracy on the most confident ``coverage`` share (what the small model keeps when the rest goes to
    the LLM), with the confidence at that cut: points of the risk-coverage curve."""
    conf, right = _ranked(confidences, correct)
    out = []
    for coverage in coverages if len(right) else ():
        k = max(1, math.ceil(len(right) * coverage - 1e-9))
        out.append({"coverage": coverage, "accuracy": float(right[:k].mean()), "min_confidence": float(conf[k - 1])})
    return out
