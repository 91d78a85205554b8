"""The arithmetic of ``shunt report`` and ``shunt top`` on metrics.v1 messages, kept apart from rendering.

:class:`Period` adds up the *windows* of every message read (exactly what the stream did in a period);
:class:`Fleet` sums the *latest totals* of each instance (an instance id that restarted keeps its earlier
runs' totals) and takes rates, latency, lag and breaker from the live ones. Both give a :class:`Summary`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consumer.observe.meter import LATENCY_PATHS, ratio

BREAKER_ORDER = ("closed", "half_open", "open")  # worst last
COUNT_FIELDS = (
    "reviews_in", "labeled", "small", "large", "fallback", "cache_hits", "dlq", "llm_requests", "llm_retries",
    "llm_429s", "llm_errors", "prompt_tokens", "completion_tokens", "cost_usd", "baseline_cost_usd",
)  # fmt: skip
_QUANTILES = ("p50", "p95", "p99")
_STALE_WINDOWS = 3
_MIN_STALE_MS = 30_000


def add_counts(into: dict[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """Add one ``counts`` object of metrics.v1 into another (in place; returns it)."""
    for name in COUNT_FIELDS:
        into[name] = into.get(name, 0) + more[name]
    reasons = Counter(into.get("dlq_by_reason", {}))
    reasons.update(more["dlq_by_reason"])
    into["dlq_by_reason"] = dict(sorted(reasons.items()))
    return into


def zero_counts() -> dict[str, Any]:
    return {**dict.fromkeys(COUNT_FIELDS, 0), "dlq_by_reason": {}, "cost_usd": 0.0, "baseline_cost_usd": 0.0}


class LatencyMix:
    """Combines per-window percentiles: exact for one window, a count-weighted mean for several."""

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()
        self._weighted: dict[tuple[str, str], float] = {}
        self._weights: Counter[tuple[str, str]] = Counter()

    def add(self, latency: Mapping[str, Mapping[str, Any]]) -> None:
        for path, summary in latency.items():
            self._count[path] += summary["count"]
            for q in _QUANTILES:
                if summary[q] is not None and summary["count"] > 0:
                    key = (path, q)
                    self._weighted[key] = self._weighted.get(key, 0.0) + summary[q] * summary["count"]
                    self._weights[key] += summary["count"]

    def result(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path in LATENCY_PATHS:
            row: dict[str, Any] = {"count": self._count[path]}
            for q in _QUANTILES:
                weight = self._weights[(path, q)]
                row[q] = round(self._weighted[(path, q)] / weight, 3) if weight else None
            out[path] = row
        return out


def worst_breaker(states: Iterable[str]) -> str | None:
    known = [s for s in states if s in BREAKER_ORDER]
    return max(known, key=BREAKER_ORDER.index) if known else None


def configs(latest: Iterable[Mapping[str, Any]]) -> list[str]:
    """The distinct configurations the instances report (several while a new model or threshold rolls out)."""
    seen = {
        f"threshold {m['threshold']}, model {m['model_version']}, prompt {m['prompt_version']}, llm {m['llm_model']}"
        for m in latest
    }
    return sorted(seen)


def merged_lag(latest: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Lag per partition from each instance's latest message; the newer report wins a shared partition."""
    lag: dict[str, int] = {}
    for message in sorted(latest, key=lambda m: m["window_end_ms"]):
        lag.update(message["lag"])
    return dict(sorted(lag.items()))


def shunt_share(counts: Mapping[str, Any]) -> float | None:
    """(large + fallback) / labeled of a ``counts`` object; None before the first label."""
    return ratio(counts["large"] + counts["fallback"], counts["labeled"])


def window_seconds(message: Mapping[str, Any]) -> float:
    """The length of a message's window in seconds (at least a millisecond)."""
    span_ms: int = message["window_end_ms"] - message["window_start_ms"]
    return max(span_ms, 1) / 1000


def window_rate(message: Mapping[str, Any]) -> float:
    """Reviews per second read in a message's window."""
    reviews: int = message["window"]["reviews_in"]
    return reviews / window_seconds(message)


@dataclass
class Summary:
    """What ``top`` and ``report`` show; ``as_json`` is the ``report --json`` document."""

    counts: dict[str, Any]
    seconds: float | None
    reviews_per_s: float | None
    latency: dict[str, dict[str, Any]]
    lag: dict[str, int]
    breaker_state: str | None
    instances: list[str]
    groups: list[str]
    messages: int
    configs: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def savings_usd(self) -> float:
        return float(self.counts["baseline_cost_usd"] - self.counts["cost_usd"])

    def as_json(self) -> dict[str, Any]:
        c = self.counts
        return {
            **self.extra,
            "messages": self.messages,
            "instances": self.instances,
            "groups": self.groups,
            "seconds": self.seconds,
            "reviews_per_s": self.reviews_per_s,
            "totals": c,
            "shunt_rate": shunt_share(c),
            "cost_usd": c["cost_usd"],
            "baseline_cost_usd": c["baseline_cost_usd"],
            "savings_usd": self.savings_usd,
            "savings_pct": _pct(ratio(self.savings_usd, c["baseline_cost_usd"])),
            "cost_ratio": ratio(c["cost_usd"], c["baseline_cost_usd"]),
            "latency_ms": self.latency,
            "lag": self.lag,
            "lag_total": sum(self.lag.values()),
            "breaker_state": self.breaker_state,
            "configs": self.configs,
        }


def _pct(value: float | None) -> float | None:
    return None if value is None else value * 100


class Period:
    """Adds up the windows of every message read: exactly what the stream did in the period."""

    def __init__(self) -> None:
        self.counts = zero_counts()
        self.latency = LatencyMix()
        self.latest: dict[str, dict[str, Any]] = {}
        self.messages = 0
        self._first_start: int | None = None
        self._last_end: int | None = None

    def add(self, message: dict[str, Any]) -> None:
        self.messages += 1
        add_counts(self.counts, message["window"])
        self.latency.add(message["latency_ms"])
        self.latest[message["instance_id"]] = message
        start, end = message["window_start_ms"], message["window_end_ms"]
        self._first_start = start if self._first_start is None else min(self._first_start, start)
        self._last_end = end if self._last_end is None else max(self._last_end, end)

    def summary(self) -> Summary:
        seconds = None
        if self._first_start is not None and self._last_end is not None:
            seconds = (self._last_end - self._first_start) / 1000
        latest = list(self.latest.values())
        return Summary(
            counts=self.counts,
            seconds=seconds,
            reviews_per_s=ratio(self.counts["reviews_in"], seconds or 0.0),
            latency=self.latency.result(),
            lag=merged_lag(latest),
            breaker_state=worst_breaker(m["breaker_state"] for m in latest),
            instances=sorted(self.latest),
            groups=sorted({m["group_id"] for m in latest}),
            messages=self.messages,
            configs=configs(latest),
        )


class Fleet:
    """The latest message of each instance id, and the totals of its earlier runs."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self._retired: dict[str, dict[str, Any]] = {}
        self.messages = 0

    def add(self, message: dict[str, Any]) -> None:
        self.messages += 1
        key = message["instance_id"]
        previous = self.latest.get(key)
        if previous is not None and message["seq"] <= previous["seq"]:
            # The same instance id started again from seq 0: keep what its earlier run counted.
            self._retired[key] = add_counts(self._retired.get(key) or zero_counts(), previous["totals"])
        self.latest[key] = message

    def state(self, message: Mapping[str, Any], now_ms: int) -> str:
        """``final``, ``live``, or ``stale`` (silent for several windows)."""
        if message["final"]:
            return "final"
        stale_ms = max(_STALE_WINDOWS * window_seconds(message) * 1000, _MIN_STALE_MS)
        return "live" if now_ms - message["window_end_ms"] <= stale_ms else "stale"

    def live(self, now_ms: int) -> list[dict[str, Any]]:
        return [m for m in self.latest.values() if self.state(m, now_ms) == "live"]

    def summary(self, now_ms: int) -> Summary:
        counts = zero_counts()
        for totals in [m["totals"] for m in self.latest.values()] + list(self._retired.values()):
            add_counts(counts, totals)
        live = self.live(now_ms)
        latency = LatencyMix()
        for message in live:
            latency.add(message["latency_ms"])
        return Summary(
            counts=counts,
            seconds=None,
            reviews_per_s=sum(window_rate(m) for m in live) if live else None,
            latency=latency.result(),
            lag=merged_lag(live),
            breaker_state=worst_breaker(m["breaker_state"] for m in live),
            instances=sorted(self.latest),
            groups=sorted({m["group_id"] for m in self.latest.values()}),
            messages=self.messages,
            configs=configs(self.latest.values()),
        )
