"""``shunt report``: a one-shot summary of the metrics topic, for humans (a table) and scripts (``--json``).

The summary adds up the *windows* published since ``--since`` (read from the offset that
``offsets_for_times`` gives for that moment), so it is exactly what the stream did in that period. ``shunt
top`` reuses the reader and the arithmetic here, but sums the *latest totals* of each instance instead.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console, Group
from rich.table import Table

from consumer import contracts
from consumer.commands.common import config_option, prune, settings_from
from consumer.config import Settings, librdkafka_config
from consumer.contracts import ContractError
from consumer.observe.meter import LATENCY_PATHS, ratio

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
BREAKER_ORDER = ("closed", "half_open", "open")  # worst last
COUNT_FIELDS = (
    "reviews_in", "labeled", "small", "large", "fallback", "cache_hits", "dlq", "llm_requests", "llm_retries",
    "llm_429s", "llm_errors", "prompt_tokens", "completion_tokens", "cost_usd", "baseline_cost_usd",
)  # fmt: skip


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``45s``, ``30m``, ``1h``, ``2d``."""
    match = _DURATION.match(text)
    if match is None:
        raise click.BadParameter(f"expected a duration like 90s, 30m, 1h or 2d, got {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


# -- arithmetic on metrics.v1 messages ----------------------------------------------------------------------
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
            for q in ("p50", "p95", "p99"):
                if summary[q] is not None and summary["count"] > 0:
                    key = (path, q)
                    self._weighted[key] = self._weighted.get(key, 0.0) + summary[q] * summary["count"]
                    self._weights[key] += summary["count"]

    def result(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path in LATENCY_PATHS:
            row: dict[str, Any] = {"count": self._count[path]}
            for q in ("p50", "p95", "p99"):
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
            "shunt_rate": ratio(c["large"] + c["fallback"], c["labeled"]),
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


# -- reading the topic ---------------------------------------------------------------------------------------
class MetricsReader:
    """Reads metrics.v1 messages of one topic from a moment (or the start) without joining a group."""

    def __init__(self, settings: Settings, since_ms: int | None = None, group_filter: str = "*") -> None:
        from confluent_kafka import Consumer  # the client loads only when a command reads the topic

        conf = librdkafka_config(settings.kafka, "consumer")
        conf |= {"group.id": f"shunt-reader-{uuid.uuid4().hex[:10]}", "enable.auto.commit": False}
        conf.pop("enable.auto.offset.store", None)
        self.topic = settings.topics.metrics
        self.group_filter = group_filter
        self._since_ms = since_ms if since_ms is not None else -1
        self._consumer = Consumer(conf, logger=None)
        self._next: dict[int, int] = {}
        self._end: dict[int, int] = {}
        self.skipped = 0
        self._assign(since_ms)

    def _assign(self, since_ms: int | None) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        metadata = self._consumer.list_topics(self.topic, timeout=15).topics.get(self.topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            self.close()
            raise click.ClickException(f"metrics topic {self.topic!r} not found")
        tps = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
        if since_ms is not None:
            tps = self._consumer.offsets_for_times([TopicPartition(self.topic, p.partition, since_ms) for p in tps], 15)
        for tp in tps:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=15)
            self._end[tp.partition] = high
            self._next[tp.partition] = tp.offset if tp.offset >= 0 else (high if since_ms is not None else low)
            tp.offset = self._next[tp.partition]
        self._consumer.assign(tps)

    def poll(self, timeout_s: float) -> list[dict[str, Any]]:
        """Decoded, schema-valid messages of the groups that match the filter; others are counted as skipped."""
        out = []
        for message in self._consumer.consume(1000, timeout_s):
            if message.error() is not None:
                continue
            self._next[message.partition() or 0] = (message.offset() or 0) + 1
            if message.timestamp()[1] < self._since_ms:
                continue  # a late write stamped before the period (offsets_for_times starts at the first in it)
            decoded = self._decode(message.value())
            if decoded is not None and fnmatchcase(decoded["group_id"], self.group_filter):
                out.append(decoded)
        return out

    def _decode(self, raw: bytes | None) -> dict[str, Any] | None:
        try:
            message: dict[str, Any] = contracts.loads(raw or b"")
            contracts.validate("metrics", message)
        except (orjson.JSONDecodeError, ContractError):
            self.skipped += 1
            return None
        return message

    def caught_up(self) -> bool:
        """Everything that was on the topic when the reader opened has been read."""
        return all(self._next[p] >= end for p, end in self._end.items())

    def read_all(self, timeout_s: float = 60.0) -> Iterator[dict[str, Any]]:
        """Every message up to the end the topic had at open."""
        deadline = time.monotonic() + timeout_s
        while not self.caught_up():
            if time.monotonic() > deadline:
                raise click.ClickException(f"timed out reading {self.topic!r}")
            yield from self.poll(0.5)

    def close(self) -> None:
        self._consumer.close()


# -- presenting ------------------------------------------------------------------------------------------------
def money(value: float) -> str:
    return f"${value:,.6f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def headline_rows(s: Summary) -> list[tuple[str, str]]:
    """The rows both ``top`` and ``report`` print, in order."""
    data, c = s.as_json(), s.counts
    savings_pct = data["savings_pct"]
    return [
        ("throughput", f"{number(s.reviews_per_s)} reviews/s"),
        ("reviews", f"{c['reviews_in']:,} in, {c['labeled']:,} labeled, {c['dlq']:,} dlq"),
        ("decided by", f"small {c['small']:,}, large {c['large']:,}, fallback {c['fallback']:,}"),
        ("shunt rate", percent(data["shunt_rate"])),
        ("spend", money(c["cost_usd"])),
        ("baseline", money(c["baseline_cost_usd"])),
        ("savings", f"{money(s.savings_usd)} ({'-' if savings_pct is None else f'{savings_pct:.1f}%'})"),
        ("cost ratio", percent(data["cost_ratio"])),
        ("llm", _llm_row(c)),
        ("lag", f"{data['lag_total']:,} ({len(s.lag)} partitions)"),
        ("breaker", s.breaker_state or "-"),
        ("config", "; ".join(s.configs) or "-"),
    ]


def _llm_row(c: Mapping[str, Any]) -> str:
    return (
        f"requests {c['llm_requests']:,}, retries {c['llm_retries']:,}, 429s {c['llm_429s']:,}, "
        f"errors {c['llm_errors']:,}, cache hits {c['cache_hits']:,}, "
        f"tokens {c['prompt_tokens']:,}+{c['completion_tokens']:,}"
    )


def latency_table(latency: Mapping[str, Mapping[str, Any]]) -> Table:
    table = Table("latency ms", "count", "p50", "p95", "p99", title=None, expand=False)
    for path in LATENCY_PATHS:
        row = latency.get(path, {"count": 0, "p50": None, "p95": None, "p99": None})
        table.add_row(path, f"{row['count']:,}", *(number(row[q]) for q in ("p50", "p95", "p99")))
    return table


def summary_view(s: Summary, title: str) -> Group:
    head = Table(show_header=False, title=title, title_justify="left", expand=False)
    head.add_column(style="bold")
    head.add_column()
    for name, value in headline_rows(s):
        head.add_row(name, value)
    return Group(head, latency_table(s.latency))


def reader_settings(config_path: Path | None, bootstrap: str | None, topic: str | None) -> Settings:
    overrides = prune({"kafka": {"bootstrap_servers": bootstrap}, "topics": {"metrics": topic}})
    return settings_from(config_path, overrides)


@click.command(name="report")
@config_option
@click.option("--bootstrap", help="Kafka bootstrap servers HOST:PORT[,...] (kafka.bootstrap_servers).")
@click.option("--topic", help="Metrics topic (topics.metrics).")
@click.option("--since", "since", default="1h", show_default=True, help="Period to summarise: 90s, 30m, 1h, 2d.")
@click.option("--group-filter", default="*", show_default=True, help="Consumer group ids to include (glob).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def command(
    config_path: Path | None, bootstrap: str | None, topic: str | None, since: str, group_filter: str, as_json: bool
) -> None:
    """Summarise the metrics topic over the last --since: reviews, shunt rate, spend, baseline, savings.

    Adds up the windows every instance published in the period (exact for the period, whatever restarted)."""
    seconds = parse_duration(since)
    settings = reader_settings(config_path, bootstrap, topic)
    until_ms = time.time_ns() // 1_000_000
    since_ms = until_ms - int(seconds * 1000)
    reader = MetricsReader(settings, since_ms, group_filter)
    period = Period()
    try:
        for message in reader.read_all():
            period.add(message)
    finally:
        reader.close()
    summary = period.summary()
    summary.extra = {"topic": reader.topic, "since_ms": since_ms, "until_ms": until_ms, "skipped": reader.skipped}
    if as_json:
        click.echo(orjson.dumps(summary.as_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        Console().print(summary_view(summary, f"{reader.topic}: last {since} ({summary.messages} windows)"))
