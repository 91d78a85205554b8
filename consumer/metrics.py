"""The cost meter: counts what the pipeline decided and what it cost, per window and in total.

The pipeline calls the ``on_*`` methods on the event loop; :meth:`Meter.snapshot` closes a window. Costs
are summed from exactly the values written into output messages, so the metrics reconcile with the
output topic to the cent.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from consumer.config import PriceConfig
from consumer.records import LlmAnswer, Source

_RESERVOIR = 20_000
LATENCY_PATHS = ("small", "large", "fallback")


@dataclass
class Counts:
    reviews_in: int = 0
    labeled: int = 0
    small: int = 0
    large: int = 0
    fallback: int = 0
    cache_hits: int = 0
    dlq: int = 0
    dlq_by_reason: Counter[str] = field(default_factory=Counter)
    llm_requests: int = 0
    llm_retries: int = 0
    llm_429s: int = 0
    llm_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0

    def minus(self, other: Counts) -> Counts:
        diff = Counts()
        for f in fields(self):
            if f.name == "dlq_by_reason":
                diff.dlq_by_reason = self.dlq_by_reason - other.dlq_by_reason
            else:
                setattr(diff, f.name, getattr(self, f.name) - getattr(other, f.name))
        return diff

    def copy(self) -> Counts:
        clone = Counts(**{f.name: getattr(self, f.name) for f in fields(self)})
        clone.dlq_by_reason = Counter(self.dlq_by_reason)
        return clone

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["dlq_by_reason"] = dict(self.dlq_by_reason)
        data["cost_usd"] = round(self.cost_usd, 9)
        data["baseline_cost_usd"] = round(self.baseline_cost_usd, 9)
        return data


class Reservoir:
    """A bounded uniform sample of latencies, so percentiles cost flat memory under any load."""

    def __init__(self, size: int = _RESERVOIR, seed: int = 0) -> None:
        self._size = size
        self._seen = 0
        self._values: list[float] = []
        self._random = random.Random(seed)

    def add(self, value: float) -> None:
        self._seen += 1
        if len(self._values) < self._size:
            self._values.append(value)
        else:
            slot = self._random.randrange(self._seen)
            if slot < self._size:
                self._values[slot] = value

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self._values)

        def pct(q: float) -> float | None:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None

        return {"count": self._seen, "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)}


@dataclass(frozen=True)
class PoolCounters:
    """What the LLM pool reports about its own calls (cumulative)."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: int = 0


class Meter:
    """Counts per window and in total. Baseline: what the same reviews would have cost at the LLM."""

    def __init__(self, price: PriceConfig, default_completion_tokens: int) -> None:
        self._price = price
        self._default_completion = default_completion_tokens
        self.totals = Counts()
        self._window_start = Counts()
        self._baseline_prompt_tokens = 0
        self.latency: dict[str, Reservoir] = {p: Reservoir() for p in LATENCY_PATHS}

    def on_input(self, count: int = 1) -> None:
        self.totals.reviews_in += count

    def on_dlq(self, reason: str) -> None:
        self.totals.dlq += 1
        self.totals.dlq_by_reason[reason] += 1

    def on_labeled(
        self, source: Source, cost_usd: float, answer: LlmAnswer | None, est_prompt_tokens: int, latency_ms: float
    ) -> None:
        """Count one published review. ``est_prompt_tokens``: the client's estimate, used for the baseline."""
        totals = self.totals
        totals.labeled += 1
        setattr(totals, source, getattr(totals, source) + 1)
        totals.cost_usd += cost_usd
        real = answer is not None and not answer.cached
        if answer is not None and answer.cached:
            totals.cache_hits += 1
        if real and answer is not None:
            totals.prompt_tokens += answer.prompt_tokens
            totals.completion_tokens += answer.completion_tokens
        self._baseline_prompt_tokens += answer.prompt_tokens if real and answer is not None else est_prompt_tokens
        self.latency[source if source in self.latency else "large"].add(latency_ms)

    def average_completion_tokens(self) -> float:
        large = self.totals.large - self.totals.cache_hits
        if large > 0 and self.totals.completion_tokens > 0:
            return self.totals.completion_tokens / large
        return float(self._default_completion)

    def baseline_cost(self) -> float:
        completion = self.totals.labeled * self.average_completion_tokens()
        price = self._price
        return (self._baseline_prompt_tokens * price.input_per_mtok + completion * price.output_per_mtok) / 1e6

    def close_window(self, pool: PoolCounters) -> tuple[Counts, Counts]:
        """Returns (window, totals) and starts a new window."""
        totals = self.totals
        totals.llm_requests, totals.llm_retries = pool.requests, pool.retries
        totals.llm_429s, totals.llm_errors = pool.rate_limited, pool.errors
        totals.baseline_cost_usd = self.baseline_cost()
        window = totals.minus(self._window_start)
        self._window_start = totals.copy()
        return window, totals.copy()
