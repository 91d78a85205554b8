"""Who answers: ``replay`` (what the label file records), ``oracle`` (the true label, mostly) or ``first``.

``oracle`` answers the file's true label with probability ``accuracy`` (``hard_accuracy`` for rows marked
``"hard": true``), seeded by the text so it is repeatable, and a wrong one among the offered labels
otherwise. A label file row is found by the ``X-Review-Id`` header or the normalised text, in the order
:class:`~consumer.offline.labels.LabelBook` defines for every label file.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Protocol

from consumer.llm.prompting import normalise_text
from consumer.offline.labels import LabelBook
from consumer.sandbox.standin.config import StandinConfig


class Policy(Protocol):
    """Chooses the answer for one review; None means it does not know this review."""

    def answer(self, text: str, review_id: str | None, allowed: Sequence[str]) -> str | None: ...


class FirstPolicy:
    def answer(self, text: str, review_id: str | None, allowed: Sequence[str]) -> str | None:
        return allowed[0] if allowed else None


class ReplayPolicy:
    def __init__(self, book: LabelBook) -> None:
        self._book = book

    def answer(self, text: str, review_id: str | None, allowed: Sequence[str]) -> str | None:
        row = self._book.find(review_id, text)
        label = row.get("label") if row else None
        return label if isinstance(label, str) else None


class OraclePolicy:
    """Right with probability ``accuracy`` (``hard_accuracy`` for hard rows), repeatably per text."""

    def __init__(self, book: LabelBook, accuracy: float, hard_accuracy: float | None, seed: int) -> None:
        self._book, self._accuracy, self._seed = book, accuracy, seed
        self._hard_accuracy = accuracy if hard_accuracy is None else hard_accuracy

    def answer(self, text: str, review_id: str | None, allowed: Sequence[str]) -> str | None:
        row = self._book.find(review_id, text)
        if row is None or not isinstance(row.get("label"), str):
            return None
        truth: str = row["label"]
        digest = hashlib.sha256(f"{self._seed}\0{normalise_text(text)}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        accuracy = self._hard_accuracy if row.get("hard") else self._accuracy
        if rng.random() < accuracy and truth in allowed:
            return truth
        wrong = [label for label in allowed if label != truth]
        return rng.choice(wrong) if wrong else truth


def make_policy(config: StandinConfig) -> Policy:
    if config.policy == "first":
        return FirstPolicy()
    assert config.labels is not None  # checked by StandinConfig
    book = LabelBook.load(config.labels)
    if config.policy == "replay":
        return ReplayPolicy(book)
    return OraclePolicy(book, config.accuracy, config.hard_accuracy, config.seed)
