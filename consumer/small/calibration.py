"""Calibration arithmetic, one copy: tempered softmax, NLL, the temperature fit, reliability bins and ECE.

Training, evaluation, distillation and the scorer all use these, so the ECE in the model card, in
``shunt eval`` and in a distill report are the same number computed the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
RELIABILITY_BINS = 15


def softmax(logits: npt.NDArray[np.floating], temperature: float = 1.0) -> Floats:
    """Row-wise softmax of ``logits / temperature``, stable for large logits."""
    z = logits.astype(np.float64, copy=False) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    out: Floats = z / z.sum(axis=1, keepdims=True)
    return out


def nll(logits: Floats, targets: Floats, temperature: float) -> float:
    """Mean cross-entropy of the tempered softmax against (soft) targets."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-(targets * log_probs).sum(axis=1).mean())


def fit_temperature(logits: Floats, targets: Floats, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature that minimises NLL, by golden-section search on log T (NLL is unimodal in T)."""
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(logits, targets, math.exp(c)) < nll(logits, targets, math.exp(d)):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)


@dataclass(frozen=True, slots=True)
class Bin:
    """One confidence bin (low, high]: how many reviews, how often right, how confident on average."""

    low: float
    high: float
    count: int
    accuracy: float | None
    confidence: float | None


def reliability(confidences: Sequence[float], correct: Sequence[bool], bins: int = RELIABILITY_BINS) -> list[Bin]:
    """Equal-width bins over [0, 1], right-closed (a confidence of 0 joins the first)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    conf = np.asarray(confidences, dtype=np.float64)
    right = np.asarray(correct, dtype=bool)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        acc = float(right[members].mean()) if count else None
        mean = float(conf[members].mean()) if count else None
        out.append(Bin(float(edges[b]), float(edges[b + 1]), count, acc, mean))
    return out


def expected_calibration_error(found: Sequence[Bin]) -> float:
    """ECE (Guo et al., 2017): sum over bins of |accuracy - confidence| weighted by the bin's share."""
    total = sum(b.count for b in found)
    gaps = (
        b.count / total * abs(b.accuracy - b.confidence)
        for b in found
        if b.accuracy is not None and b.confidence is not None
    )
    return math.fsum(gaps) if total else 0.0


def ece_of(probs: Floats, truth: npt.NDArray[np.intp], bins: int = RELIABILITY_BINS) -> float:
    """ECE of a probability matrix against the true label indices."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == truth
    return expected_calibration_error(reliability(confidence.tolist(), correct.tolist(), bins))
