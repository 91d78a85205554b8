"""What is true about the demo's stream (the reviews, the oracle's answers) and the tally of what came out.

The oracle is asked offline, for every review, with the same label file, accuracy and seed as the running
stand-in; its answers depend only on the text, so they are the answers it gives online.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from consumer.llm.prompting import estimate_prompt_tokens
from consumer.observe.meter import Meter, Reservoir
from consumer.records import LlmAnswer, Source
from consumer.sandbox.demo.options import DemoOptions
from consumer.sandbox.reviewgen import LABELS, SyntheticReview
from consumer.sandbox.standin import Faults, Policy, StandinConfig

_SOURCES: dict[str, Source] = {"small": "small", "large": "large", "fallback": "fallback"}


@dataclass(frozen=True)
class Truth:
    """The generated reviews, by id, with what the oracle LLM would answer for each."""

    reviews: tuple[SyntheticReview, ...]
    by_id: Mapping[str, SyntheticReview]
    oracle: Mapping[str, str]


def write_labels(reviews: Sequence[SyntheticReview], path: Path) -> Path:
    """The stand-in's label file: JSON lines ``{"id", "text", "label", "hard"}``."""
    with path.open("wb") as handle:
        for review in reviews:
            row = {"id": review.id, "text": review.text, "label": review.label, "hard": review.hard}
            handle.write(orjson.dumps(row) + b"\n")
    return path


def standin_config(options: DemoOptions, labels: Path) -> StandinConfig:
    faults = Faults(
        latency_ms=options.llm_latency_ms, rpm=options.llm_rpm, batch_turnaround_s=options.batch_turnaround_s
    )
    return StandinConfig(
        policy="oracle",
        labels=labels,
        accuracy=options.llm_accuracy,
        hard_accuracy=options.llm_hard_accuracy,
        seed=options.seed,
        faults=faults,
    )


def make_truth(reviews: Sequence[SyntheticReview], policy: Policy) -> Truth:
    """Ask the oracle offline, for every review, what it answers when offered every label."""
    oracle = {r.id: policy.answer(r.text, r.id, LABELS) or LABELS[0] for r in reviews}
    return Truth(tuple(reviews), {r.id: r for r in reviews}, oracle)


@dataclass
class Tally:
    """Everything counted from the output, DLQ and metrics topics, as the messages arrive."""

    truth: Truth
    meter: Meter
    produced: int = 0
    labelled: int = 0
    dlq: int = 0
    duplicates: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    lanes: Counter[str] = field(default_factory=Counter)  # LLM answers by the lane that gave them
    correct: Counter[str] = field(default_factory=Counter)
    llm_checked: int = 0
    llm_as_predicted: int = 0
    llm_cached: int = 0
    latency: dict[str, Reservoir] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    model_version: str | None = None
    threshold: float | None = None
    service_totals: dict[str, Any] | None = None
    service_loop: dict[str, Any] | None = None  # the closed loop's block of the final metrics message

    def on_labeled(self, message: Mapping[str, Any]) -> None:
        """Count one output message; a duplicate (at-least-once) is counted once."""
        review = self.truth.by_id.get(str(message.get("id")))
        source = str(message.get("source"))
        if review is None or source not in _SOURCES or review.id in self.seen:
            self.duplicates += review is not None and review.id in self.seen
            return
        self.seen.add(review.id)
        self.labelled += 1
        self.sources[source] += 1
        if source == "large":
            self.lanes[str(message.get("lane", "online"))] += 1
        self.model_version, self.threshold = message.get("model_version"), message.get("threshold")
        self.correct["small"] += message["small"]["label"] == review.label
        self.correct["shunt"] += message["label"] == review.label
        self.correct["llm"] += self.truth.oracle[review.id] == review.label
        self._meter(message, review, source)
        self._latency(message, source)

    def _meter(self, message: Mapping[str, Any], review: SyntheticReview, source: str) -> None:
        # The same call the pipeline makes, from what the output message carries.
        llm = message.get("llm")
        answer = _answer(llm) if source == "large" and llm else None
        if answer is not None and answer.cached:
            self.llm_cached += 1  # the service's answer cache: an identical review was asked before
        elif answer is not None:
            self.llm_checked += 1
            self.llm_as_predicted += answer.label == self.truth.oracle[review.id]
        estimate = estimate_prompt_tokens(review.text) if source in ("small", "fallback") else 0
        latency = float(message.get("latency_ms") or 0.0)
        self.meter.on_labeled(_SOURCES[source], float(message["cost_usd"]), answer, estimate, latency)

    def _latency(self, message: Mapping[str, Any], source: str) -> None:
        value = message.get("latency_ms")
        if value is None or self.labelled == 1:
            return  # the first review waited for the consumer group to form
        for path in ("all", source):
            self.latency.setdefault(path, Reservoir()).add(float(value))

    def on_dlq(self, message: Mapping[str, Any]) -> None:
        self.dlq += 1

    def on_metrics(self, message: Mapping[str, Any]) -> None:
        if message.get("final"):
            self.service_totals = dict(message.get("totals") or {})
            self.service_loop = message.get("loop")


def _answer(llm: Mapping[str, Any]) -> LlmAnswer:
    return LlmAnswer(
        label=str(llm["label"]),
        model=str(llm["model"]),
        prompt_tokens=int(llm["prompt_tokens"]),
        completion_tokens=int(llm["completion_tokens"]),
        cost_usd=float(llm["cost_usd"]),
        latency_ms=float(llm["latency_ms"]),
        prompt_version=str(llm["prompt_version"]),
        cached=bool(llm["cached"]),
        attempts=int(llm["attempts"]),
    )
