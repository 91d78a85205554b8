"""A bounded LRU of LLM answers: the same review, asked the same way, is paid for once.

The key is (normalised text, prompt version, model, allowed labels): a different template, model or label
set is a different question. Only usable answers are stored; a hit is an :class:`LlmAnswer` with
``cached=True`` and no cost.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from consumer.llm.prompting import normalise_text
from consumer.records import LlmAnswer

CacheKey = tuple[str, str, str, tuple[str, ...]]


def cache_key(text: str, prompt_version: str, model: str, allowed_labels: tuple[str, ...]) -> CacheKey:
    return (normalise_text(text), prompt_version, model, allowed_labels)


class LlmCache:
    """LRU of at most ``capacity`` answers (0 disables it). Counts hits and misses."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self._capacity = capacity
        self._answers: OrderedDict[CacheKey, LlmAnswer] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: CacheKey) -> LlmAnswer | None:
        """The stored answer as a free, cached one; None on a miss."""
        if self._capacity == 0:
            return None
        answer = self._answers.get(key)
        if answer is None:
            self.misses += 1
            return None
        self._answers.move_to_end(key)
        self.hits += 1
        return replace(
            answer,
            prompt_tokens=0,
            completion_tokens=0,
            cost_usd=0.0,
            latency_ms=0.0,
            cached=True,
            attempts=0,
        )

    def put(self, key: CacheKey, answer: LlmAnswer) -> None:
        if self._capacity == 0 or answer.cached:
            return
        self._answers[key] = answer
        self._answers.move_to_end(key)
        while len(self._answers) > self._capacity:
            self._answers.popitem(last=False)
