"""A bounded LRU of LLM answers: the same review, asked the same way, is paid for once.

The key is (a digest of the normalised text, prompt version, model, allowed labels): a different template,
model or label set is a different question. The digest, not the text, so a full cache of 90 KB reviews
holds a few MB, not a GB. The cache is bounded by count and by an estimate of the bytes it holds. Only
usable answers are stored; a hit is an :class:`LlmAnswer` with ``cached=True`` and no cost.
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from dataclasses import replace

from consumer.llm.prompting import normalise_text
from consumer.records import LlmAnswer

CacheKey = tuple[str, str, str, tuple[str, ...]]


ENTRY_OVERHEAD_BYTES = 600
"""The dict slot, key tuple, digest and answer record of one entry (measured ~520 with sys.getsizeof)."""


def cache_key(text: str, prompt_version: str, model: str, allowed_labels: tuple[str, ...]) -> CacheKey:
    digest = hashlib.blake2b(normalise_text(text).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return (digest, prompt_version, model, allowed_labels)


def entry_bytes(key: CacheKey, answer: LlmAnswer) -> int:
    """What one entry costs in memory, roughly: a fixed overhead plus its strings."""
    strings = (answer.label, answer.model, answer.prompt_version, *key[3])
    return ENTRY_OVERHEAD_BYTES + sum(sys.getsizeof(text) for text in strings)


class LlmCache:
    """LRU of at most ``capacity`` answers and about ``max_bytes`` of memory (either 0 disables it)."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        if capacity < 0 or (max_bytes is not None and max_bytes < 0):
            raise ValueError("capacity and max_bytes must be >= 0")
        self._capacity = capacity if max_bytes != 0 else 0
        self._max_bytes = max_bytes
        self._answers: OrderedDict[CacheKey, tuple[LlmAnswer, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: CacheKey) -> LlmAnswer | None:
        """The stored answer as a free, cached one; None on a miss."""
        if self._capacity == 0:
            return None
        entry = self._answers.get(key)
        if entry is None:
            self.misses += 1
            return None
        answer = entry[0]
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
        size = entry_bytes(key, answer)
        old = self._answers.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._answers[key] = (answer, size)
        self.bytes += size
        while len(self._answers) > self._capacity or (self._max_bytes is not None and self.bytes > self._max_bytes):
            self.bytes -= self._answers.popitem(last=False)[1][1]
