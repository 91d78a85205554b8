"""Offline evaluation of the Data Shunt: on labelled reviews, what each threshold gains and costs.

Four methods are compared on the same reviews (see docs/evaluation.md):

* ``small``: the small model alone (costs nothing);
* ``llm``: the LLM alone, plain prompt, every review (the cost baseline);
* ``ds``: Data Shunt: confidence >= threshold keeps the small label, the rest get the plain prompt;
* ``ds_plus``: Data Shunt+: the same routing, the rest get the S4L prompt (hint + pruned labels).

The LLM is asked once per review and prompt kind; every threshold is then computed from those answers by
the pure functions of this module; :mod:`.thresholds` chooses among them, :mod:`.answers` keeps the answers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from consumer.errors import ShuntError

Kind = Literal["plain", "s4l"]
Method = Literal["ds", "ds_plus"]
KIND_OF: dict[Method, Kind] = {"ds": "plain", "ds_plus": "s4l"}
METHOD_NAMES = {"small": "small alone", "llm": "LLM alone", "ds": "DS", "ds_plus": "DS+"}
# 0 (nothing to the LLM), then 0.5 to 1 (everything to it) by 0.01: calibrated confidences crowd just below 1,
# and a coarser grid leaves gaps in cost: with 0.05 steps between 0.8 and 0.85 the shipped model's cost ratio
# jumps from 25.6% to 32.4% (docs/evaluation.md), so a cost cap between them wastes a point of accuracy.
DEFAULT_THRESHOLDS = (0.0, *(round(0.5 + step / 100, 2) for step in range(51)))


class EvaluationError(ShuntError):
    """The evaluation cannot run as asked; the message says what is missing or malformed."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The LLM's answer to one question. ``label`` None: the pool gave up (tokens it was billed still count)."""

    label: str | None
    cost_usd: float


@dataclass(frozen=True, slots=True)
class Item:
    """One labelled review as the arithmetic sees it: the truth, the small model's view and the LLM's answers.

    ``s4l`` may be None for a review whose confidence is at or above every threshold swept (never needed)."""

    truth: str
    small: str
    confidence: float
    plain: Answer
    s4l: Answer | None = None


@dataclass(frozen=True, slots=True)
class Point:
    """One method at one threshold (None for the two methods that have none)."""

    method: str
    threshold: float | None
    accuracy: float
    macro_f1: float
    llm_share: float
    cost_usd: float
    cost_ratio: float


def macro_f1(truth: Sequence[str], predicted: Sequence[str | None], labels: Iterable[str]) -> float:
    """Unweighted mean of per-label F1 over the labels that occur in the truth or the predictions.

    A None prediction (no answer) is a miss for the true label and a false alarm for no label."""
    scores = []
    for label in labels:
        tp = sum(1 for t, p in zip(truth, predicted, strict=True) if t == label and p == label)
        fp = sum(1 for t, p in zip(truth, predicted, strict=True) if t != label and p == label)
        fn = sum(1 for t, p in zip(truth, predicted, strict=True) if t == label and p != label)
        if tp + fp + fn > 0:  # a label nobody used or predicted says nothing
            scores.append(2 * tp / (2 * tp + fp + fn))
    return math.fsum(scores) / len(scores) if scores else 0.0


def accuracy(truth: Sequence[str], predicted: Sequence[str | None]) -> float:
    """Share of exact matches; 0 for no reviews."""
    if not truth:
        return 0.0
    return sum(1 for t, p in zip(truth, predicted, strict=True) if t == p) / len(truth)


def ratio(part: float, whole: float) -> float:
    """``part / whole``, 0 when the whole is 0 (nothing was spent, so nothing was saved either)."""
    return part / whole if whole > 0 else 0.0


def answer_for(item: Item, kind: Kind) -> Answer:
    """The item's answer to the ``kind`` prompt; EvaluationError when it was never asked."""
    answer = item.plain if kind == "plain" else item.s4l
    if answer is None:
        raise EvaluationError(f"no {kind} answer for a review below the threshold (confidence {item.confidence})")
    return answer


def shunt(item: Item, threshold: float, kind: Kind) -> tuple[str, float, bool]:
    """(final label, cost, sent to the LLM) for one review under Data Shunt with ``threshold``.

    When the LLM gave up, the small label stands, as the service's default fallback publishes it."""
    if item.confidence >= threshold:
        return item.small, 0.0, False
    answer = answer_for(item, kind)
    return (answer.label if answer.label is not None else item.small), answer.cost_usd, True


def labels_of(items: Sequence[Item]) -> list[str]:
    """Every label the truth or the small model uses, sorted: the label set macro-F1 averages over."""
    return sorted({item.truth for item in items} | {item.small for item in items})


def baseline_cost(items: Sequence[Item]) -> float:
    """What the LLM alone costs: the plain prompt for every review."""
    return math.fsum(item.plain.cost_usd for item in items)


def small_alone(items: Sequence[Item]) -> Point:
    """The small model's label for every review; nothing sent, nothing paid."""
    truth, predicted = [i.truth for i in items], [i.small for i in items]
    return Point("small", None, accuracy(truth, predicted), macro_f1(truth, predicted, labels_of(items)), 0, 0, 0)


def llm_alone(items: Sequence[Item]) -> Point:
    """The plain prompt's answer for every review; a review the LLM gave up on counts as wrong."""
    truth, predicted = [i.truth for i in items], [i.plain.label for i in items]
    cost = baseline_cost(items)
    share = 1.0 if items else 0.0
    f1 = macro_f1(truth, predicted, labels_of(items))
    return Point("llm", None, accuracy(truth, predicted), f1, share, cost, 1.0 if cost > 0 else 0.0)


def shunt_point(items: Sequence[Item], threshold: float, method: Method, baseline_usd: float) -> Point:
    """DS or DS+ at one threshold: accuracy, macro-F1, share sent, cost and cost ratio vs ``baseline_usd``."""
    decided = [shunt(item, threshold, KIND_OF[method]) for item in items]
    truth, predicted = [i.truth for i in items], [label for label, _, _ in decided]
    cost = math.fsum(c for _, c, _ in decided)
    share = ratio(sum(1 for _, _, sent in decided if sent), len(items))
    f1 = macro_f1(truth, predicted, labels_of(items))
    return Point(method, threshold, accuracy(truth, predicted), f1, share, cost, ratio(cost, baseline_usd))


def sweep(items: Sequence[Item], thresholds: Sequence[float]) -> dict[Method, list[Point]]:
    """DS and DS+ at every threshold, in the order given."""
    baseline = baseline_cost(items)
    return {method: [shunt_point(items, t, method, baseline) for t in thresholds] for method in ("ds", "ds_plus")}
