"""Self-labels: the stream's reviews the small model decided itself, as training rows for L4S.

The distill topic holds only the reviews the small model was unsure of, so it teaches the new model where
the old one hesitated but says nothing about the rest of a new domain. The small path's published outputs
(``labeled.v1`` with ``source`` "small", confidence at or above the router threshold, about 98% right on a
domain never trained on) cover that rest: joined by id to the input review's text they become hard-labelled
rows that carry the domain's vocabulary into the new model (self-training). docs/l4s.md has the measurement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumer.kafka.reader import TopicReadError, read_topics
from consumer.llm.prompting import normalise_text
from consumer.offline.distill.records import DistillError, decode


@dataclass(frozen=True, slots=True)
class SelfLabel:
    """A review and the label the small model published for it on its own."""

    id: str
    text: str
    label: str


def join(outputs: Iterable[Any], reviews: Iterable[Any]) -> tuple[list[SelfLabel], dict[str, int]]:
    """Small-path outputs joined by id to the text of their input review, one per id (the last of each),
    in id order; with counts of what was left out and why."""
    decided: dict[str, str] = {}
    other = 0
    for row in outputs:
        label = _small_label(row)
        if label is None:
            other += 1
            continue
        decided[row["id"]] = label
    texts: dict[str, str] = {}
    for row in reviews:
        if isinstance(row, Mapping) and isinstance(row.get("text"), str) and row.get("id") in decided:
            texts[row["id"]] = row["text"]
    found = [SelfLabel(key, texts[key], decided[key]) for key in sorted(texts)]
    counts = {"small_outputs": len(decided), "other_outputs": other, "without_input": len(decided) - len(found)}
    return found, counts


def _small_label(row: Any) -> str | None:
    if not isinstance(row, Mapping) or row.get("source") != "small":
        return None
    review_id, label = row.get("id"), row.get("label")
    return label if isinstance(review_id, str) and review_id and isinstance(label, str) else None


def read(conf: Mapping[str, Any], output_topic: str, input_topic: str, timeout_s: float) -> tuple[list[Any], list[Any]]:
    """Both topics to their current ends, decoded: the outputs first, then the input reviews."""
    try:
        outputs = [decode(m.value) for m in read_topics(conf, [output_topic], timeout_s)]
        reviews = [decode(m.value) for m in read_topics(conf, [input_topic], timeout_s)]
    except TopicReadError as exc:
        raise DistillError(f"cannot read the self-labels: {exc}") from None
    return outputs, reviews


def cap_weight(count: int, n_original: int, weight: float = 1.0) -> float:
    """Each self-label's weight: ``weight``, lowered so that together they never outweigh the original data."""
    return min(weight, n_original / count) if count else weight


def usable(found: Sequence[SelfLabel], tested: set[str], answered: set[str], labels: Sequence[str]) -> list[SelfLabel]:
    """Without labels the base model does not have (an output of another model), reviews whose normalised
    text is in an evaluation set, and reviews the LLM answered too (audited, or answered after a restart:
    the LLM's label wins)."""
    known = set(labels)
    return [s for s in found if s.label in known and s.id not in answered and normalise_text(s.text) not in tested]
