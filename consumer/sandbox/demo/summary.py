"""What the demo shows: the live snapshot, and the summary at the end with how each number is made.

- small-only / shunt accuracy: the ``small`` block and the final ``label`` of every output message.
- LLM-only accuracy: the stand-in's oracle asked offline, for every review, with the same label file, accuracy
  and seed as the running stand-in; its answers depend only on the text, so they are the answers it gives
  online. The summary counts how many LLM-routed reviews got exactly that answer online.
- spend and baseline: the service's final message on its metrics topic; without one (or when it covers other
  reviews), the output messages fed into the service's own :class:`~consumer.observe.meter.Meter`, the way the
  metrics topic computes them. The spend is a sum and agrees either way; the baseline prices the reviews the
  LLM did not see with the running average of completion tokens, so it depends a little on the order in
  which reviews finish (about 1%).
- latency: ``latency_ms`` of the output messages (input timestamp to output), after a first review that waits
  for the consumer group to form.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from consumer.observe.meter import ratio, shunt_rate
from consumer.sandbox.demo.options import RunInfo
from consumer.sandbox.demo.tally import Tally


@dataclass(frozen=True)
class Snapshot:
    """The live numbers, a few times a second."""

    phase: str
    total: int
    produced: int
    labelled: int
    small: int
    llm: int
    dlq: int
    spend_usd: float
    baseline_usd: float
    llm_requests: int
    llm_429s: int
    elapsed_s: float
    by_batch: int = 0  # LLM answers that came from the batch lane


class View(Protocol):
    """Where the demo reports its progress (the command renders it with rich)."""

    def progress(self, snapshot: Snapshot) -> None: ...


@dataclass(frozen=True)
class Money:
    """Spend and the all-LLM baseline: from the service's final metrics message when it covers the same
    reviews (``source="metrics"``), else computed from the outputs with the same meter (``"outputs"``)."""

    spend_usd: float
    baseline_usd: float
    savings_usd: float
    cost_ratio: float | None
    source: str
    outputs_spend_usd: float  # the outputs' cost_usd, plus the audits' (shadow requests have no output)
    audit_usd: float = 0.0  # in spend_usd too


@dataclass(frozen=True)
class Summary:
    """The end of the demo; ``as_dict`` is what ``--summary-json`` writes."""

    run_id: str
    broker: str
    interrupted: bool
    complete: bool
    wall_s: float
    reviews: int
    produced: int
    labelled: int
    dlq: int
    duplicates: int
    small: int
    large: int
    fallback: int
    share_to_llm: float | None
    accuracy: dict[str, float | None]
    llm_as_predicted: int
    llm_checked: int
    llm_cached: int
    money: Money
    latency_ms: dict[str, dict[str, Any]]
    llm_requests: int
    llm_429s: int
    llm_peak_per_minute: int
    llm_rpm: int
    threshold: float | None
    model_version: str | None
    llm_accuracy: tuple[float, float]
    service_totals: dict[str, Any] | None
    lane: str = "online"
    lanes: dict[str, int] = field(default_factory=dict)  # LLM answers by lane (online pool, Batch API)
    batches: int = 0  # batches the stand-in's Batch API was sent
    loop: dict[str, Any] | None = None  # the closed loop's block of the service's final metrics message

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def money(tally: Tally) -> Money:
    computed, service = tally.meter.totals, tally.service_totals
    if service is not None and service.get("labeled") == computed.labeled:
        spend, baseline, source = float(service["cost_usd"]), float(service["baseline_cost_usd"]), "metrics"
    else:
        spend, baseline, source = computed.cost_usd, computed.baseline_cost_usd, "outputs"
    loop = tally.service_loop if source == "metrics" else None
    audit = float(loop["totals"]["audit_cost_usd"]) if loop else 0.0
    outputs = computed.cost_usd + audit
    return Money(spend, baseline, baseline - spend, ratio(spend, baseline), source, outputs, audit)


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole > 0 else None


def summarise(tally: Tally, run: RunInfo, llm_stats: Mapping[str, Any]) -> Summary:
    """The summary from the tally and the stand-in's counters."""
    totals = tally.meter.totals
    options = run.options
    return Summary(
        run_id=run.run_id,
        broker=run.broker,
        interrupted=run.interrupted,
        complete=run.complete,
        wall_s=round(time.monotonic() - run.started, 3),
        reviews=options.reviews,
        produced=tally.produced,
        labelled=tally.labelled,
        dlq=tally.dlq,
        duplicates=tally.duplicates,
        small=tally.sources["small"],
        large=tally.sources["large"],
        fallback=tally.sources["fallback"],
        share_to_llm=shunt_rate(totals),
        accuracy={path: _share(tally.correct[path], tally.labelled) for path in ("small", "llm", "shunt")},
        llm_as_predicted=tally.llm_as_predicted,
        llm_checked=tally.llm_checked,
        llm_cached=tally.llm_cached,
        money=money(tally),
        latency_ms={path: sample.summary() for path, sample in sorted(tally.latency.items())},
        llm_requests=int(llm_stats.get("requests", 0)),
        llm_429s=int(llm_stats.get("rate_limited_sent", 0)),
        llm_peak_per_minute=int(llm_stats.get("max_requests_in_any_60s_window", 0)),
        llm_rpm=options.llm_rpm,
        threshold=tally.threshold,
        model_version=tally.model_version,
        llm_accuracy=(options.llm_accuracy, options.llm_hard_accuracy),
        service_totals=tally.service_totals,
        lane=options.lane,
        lanes=dict(tally.lanes),
        batches=int(llm_stats.get("batches_created", 0)),
        loop=tally.service_loop,
    )
