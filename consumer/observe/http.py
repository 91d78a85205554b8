"""The admin HTTP server: ``/healthz``, ``/readyz`` and ``/metrics`` (Prometheus text format).

``/metrics`` is served from a private registry by a collector that reads the meter at scrape time through
the same :class:`~consumer.observe.probe.Probe` the metrics topic uses, so both report the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

from consumer.observe.meter import LATENCY_PATHS, Counts, Histogram, cost_ratio, shunt_rate
from consumer.observe.probe import Probe, Reading

log = structlog.get_logger(__name__)
BREAKER_STATES = ("closed", "open", "half_open")
# (Prometheus name without _total, Counts field, help). Names are documented in docs/observability.md.
COUNTERS = (
    ("shunt_reviews_in", "reviews_in", "Input messages read (each becomes a label or a dead letter)."),
    ("shunt_llm_cache_hits", "cache_hits", "Reviews answered from the LLM answer cache, at no cost."),
    ("shunt_llm_requests", "llm_requests", "HTTP requests sent to the LLM, retries included."),
    ("shunt_llm_retries", "llm_retries", "LLM requests that were retries."),
    ("shunt_llm_rate_limited", "llm_429s", "LLM answers that were 429 Too Many Requests."),
    ("shunt_llm_errors", "llm_errors", "LLM requests that failed (5xx, connection, malformed answer)."),
    ("shunt_llm_prompt_tokens", "prompt_tokens", "Prompt tokens of the LLM answers used in labels."),
    ("shunt_llm_completion_tokens", "completion_tokens", "Completion tokens of the LLM answers used in labels."),
    ("shunt_cost_usd", "cost_usd", "USD spent: the sum of cost_usd over the labeled messages."),
    ("shunt_baseline_cost_usd", "baseline_cost_usd", "USD the same labelled reviews would have cost at the LLM."),
)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(
    kind: type[Any], name: str, doc: str, labels: list[str], rows: Iterable[tuple[tuple[str, ...], float]]
) -> Any:
    family = kind(name, doc, labels=labels)
    for key, value in rows:
        family.add_metric(list(key), value)
    return family


def _histogram(histograms: dict[str, Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "shunt_latency_seconds", "Time from dispatch to delivered output, by decision path.", labels=["path"]
    )
    for path in LATENCY_PATHS:
        hist = histograms[path]
        buckets = [(_le(bound), count) for bound, count in hist.cumulative()]
        family.add_metric([path], buckets, sum_value=hist.sum / 1000)
    return family


def _le(bound_ms: float) -> str:
    return "+Inf" if bound_ms == float("inf") else repr(bound_ms / 1000)


class MeterCollector:
    """A prometheus_client collector that reads the probe at each scrape."""

    def __init__(self, probe: Probe) -> None:
        self._probe = probe

    def collect(self) -> Iterator[Any]:
        reading = self._probe.read()
        totals = reading.totals
        for name, attr, doc in COUNTERS:
            yield _counter(name, doc, getattr(totals, attr))
        yield from self._by_label(totals)
        yield from self._gauges(reading)
        if reading.loop is not None:
            yield from loop_metrics(reading.loop)
        yield _histogram(self._probe.meter.histograms)
        yield self._info(reading)

    def _by_label(self, totals: Counts) -> Iterator[Any]:
        paths = {(p,): float(getattr(totals, p)) for p in LATENCY_PATHS}
        yield _labelled(
            CounterMetricFamily, "shunt_reviews_labeled", "Labels published, by path.", ["source"], paths.items()
        )
        reasons = {(r,): float(n) for r, n in sorted(totals.dlq_by_reason.items())}
        yield _labelled(
            CounterMetricFamily, "shunt_dlq", "Dead letters published, by reason.", ["reason"], reasons.items()
        )

    def _gauges(self, reading: Reading) -> Iterator[Any]:
        totals, info = reading.totals, self._probe.info
        yield GaugeMetricFamily("shunt_shunt_rate", "(large + fallback) / labeled.", value=_nan(shunt_rate(totals)))
        yield GaugeMetricFamily("shunt_cost_ratio", "cost / baseline.", value=_nan(cost_ratio(totals)))
        tau = info.threshold if reading.loop is None else reading.loop["threshold"]
        yield GaugeMetricFamily("shunt_router_threshold", "The router's confidence threshold in force.", value=tau)
        states = {(s,): float(s == reading.breaker_state) for s in BREAKER_STATES}
        yield _labelled(
            GaugeMetricFamily, "shunt_breaker_state", "1 for the breaker's state.", ["state"], states.items()
        )
        yield _counter("shunt_breaker_transitions", "Circuit breaker state changes.", reading.breaker_transitions)
        yield _counter("shunt_llm_timeouts", "LLM requests that timed out.", reading.llm_timeouts)
        billed = "USD the LLM billed, including answers that never became a label (abandoned, failed)."
        yield _counter("shunt_llm_billed_usd", billed, reading.llm_billed_usd)
        queues = {(q,): float(n) for q, n in reading.queues.items()}
        yield _labelled(GaugeMetricFamily, "shunt_queue_depth", "Queue depths.", ["queue"], queues.items())
        lags = {tuple(key.rsplit("/", 1)): float(n) for key, n in reading.lag.items()}
        yield _labelled(
            GaugeMetricFamily, "shunt_consumer_lag", "Messages not done.", ["topic", "partition"], lags.items()
        )

    def _info(self, reading: Reading) -> InfoMetricFamily:
        info = self._probe.info
        family = InfoMetricFamily("shunt_service", "Instance identity and versions.")
        family.add_metric(
            [],
            {
                "instance_id": info.instance_id,
                "group_id": info.group_id,
                "model_version": reading.model_version or "unknown",
                "prompt_version": info.prompt_version,
                "llm_model": info.llm_model,
            },
        )
        return family


# (Prometheus name without _total, the loop block's counter, help): the closed loop's counters.
LOOP_COUNTERS = (
    ("shunt_audits", "audits", "Shadow requests answered (audit sampling of the small path)."),
    ("shunt_audit_agreed", "audit_agreed", "Audits whose LLM answer agreed with the small model's label."),
    ("shunt_audit_skipped", "audit_skipped", "Reviews chosen for an audit but not sent (LLM backlog, spend cap)."),
    ("shunt_audit_cost_usd", "audit_cost_usd", "USD spent on audits (included in shunt_cost_usd)."),
    ("shunt_budget_fallbacks", "budget_fallbacks", "Reviews that took the fallback because the spend cap bound."),
    ("shunt_threshold_changes", "threshold_changes", "Changes of the threshold in force (risk rule, spend cap)."),
)


def loop_metrics(loop: dict[str, Any]) -> Iterator[Any]:
    """The closed loop's counters and gauges: agreement with its interval, drift alarm, routing now, budget."""
    totals = loop["totals"]
    for name, key, doc in LOOP_COUNTERS:
        yield _counter(name, doc, totals[key])
    scopes = (("window", loop["window"]), ("cumulative", totals))
    rows = [
        ((scope, part), _nan(block["agreement"][part]))
        for scope, block in scopes
        for part in ("estimate", "low", "high")
    ]
    doc = "Small path's agreement with the LLM on audits, and its Clopper-Pearson 95% interval."
    yield _labelled(GaugeMetricFamily, "shunt_audit_agreement", doc, ["scope", "bound"], rows)
    yield GaugeMetricFamily("shunt_drift_alarm", "1 while the drift alarm fires.", value=float(loop["drift_alarm"]))
    routed = "Share of this window's decisions routed to the LLM, counted when made."
    yield GaugeMetricFamily("shunt_routed_share", routed, value=_nan(loop["routed_share"]))
    yield GaugeMetricFamily("shunt_llm_pending", "LLM requests waiting or in flight.", value=loop["llm_pending"])
    budget = loop["budget"]
    if budget is not None:
        yield GaugeMetricFamily("shunt_budget_pressure", "Spend in the cap's window / its allowance.",
                                value=budget["pressure"])  # fmt: skip
        yield GaugeMetricFamily("shunt_budget_threshold", "The threshold the spend cap allows.",
                                value=budget["threshold"])  # fmt: skip


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def registry_for(probe: Probe) -> CollectorRegistry:
    """A private registry (never the global one) holding only the meter's collector."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MeterCollector(probe))
    return registry


def readiness(probe: Probe, stale_after_s: float) -> dict[str, Any]:
    """Which readiness checks pass, and what is missing: partitions, broker, model."""
    assigned = probe.assignment()
    waited = probe.unacked_for()
    version = probe.model_version()
    checks: dict[str, dict[str, Any]] = {
        "partitions": {"ok": bool(assigned), "assigned": [f"{t}/{p}" for t, p in assigned]},
        "broker": {
            "ok": waited is None or waited < stale_after_s,
            "unacknowledged_for_s": None if waited is None else round(waited, 3),
        },
        "model": {"ok": version is not None, "version": version},
        "llm": {"ok": probe.llm_ready()},  # a 401/403 from the provider: fix the key, restarting will not help
    }
    missing = [name for name, check in checks.items() if not check["ok"]]
    return {"ready": not missing, "missing": missing, "checks": checks}


class AdminServer:
    """``async with AdminServer(probe, host, port, stale_after_s) as admin``; ``admin.port`` is the bound port."""

    def __init__(self, probe: Probe, host: str, port: int, stale_after_s: float) -> None:
        self._probe = probe
        self._host = host
        self.port = port
        self._stale_after_s = stale_after_s
        self._registry = registry_for(probe)
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def __aenter__(self) -> AdminServer:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("admin_listening", host=self._host, port=self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _request: web.Request) -> web.Response:
        if not self._probe.healthy():
            return _json({"status": "failing"}, 503)  # stopping on a fatal error: restart me
        return _json({"status": "alive"}, 200)

    async def _readyz(self, _request: web.Request) -> web.Response:
        state = readiness(self._probe, self._stale_after_s)
        return _json(state, 200 if state["ready"] else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _json(data: dict[str, Any], status: int) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
