"""The admin server: /healthz, /readyz (not ready, then ready), and /metrics agreeing with the meter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from consumer.observe.http import COUNTERS, AdminServer
from consumer.observe.meter import LATENCY_PATHS, Meter
from consumer.observe.probe import Probe, ServiceInfo
from tests.unit.observe.fakes import (
    DEFAULT_COMPLETION,
    PRICE,
    FakePipeline,
    FakePool,
    FakeSink,
    FakeStats,
    answer,
    feed_mixed,
    make_settings,
)


class Service:
    """An admin server over fakes the test can change."""

    def __init__(self) -> None:
        self.meter = Meter(PRICE, DEFAULT_COMPLETION)
        self.pool, self.pipeline, self.sink = FakePool(), FakePipeline(), FakeSink()
        self.model: str | None = None
        info = ServiceInfo.from_settings(make_settings())
        self.probe = Probe(info, self.meter, self.pipeline, self.pool, self.sink, model_version=lambda: self.model)
        self.base = ""


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    state = Service()
    with capture_logs() as logs:
        async with AdminServer(state.probe, "127.0.0.1", 0, stale_after_s=30.0) as admin:
            assert admin.port > 0
            assert {"event": "admin_listening", "host": "127.0.0.1", "port": admin.port, "log_level": "info"} in logs
            state.base = f"http://127.0.0.1:{admin.port}"
            yield state


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_healthz_answers_while_alive(service: Service) -> None:
    assert await get_json(service.base + "/healthz") == (200, {"status": "alive"})


async def test_readyz_says_what_is_missing_then_ready(service: Service) -> None:
    status, body = await get_json(service.base + "/readyz")
    assert status == 503 and body["ready"] is False
    assert body["missing"] == ["partitions", "model"]
    service.pipeline.source.assigned = [("reviews", 0)]
    service.model = "m-7"
    status, body = await get_json(service.base + "/readyz")
    assert (status, body["ready"], body["missing"]) == (200, True, [])
    assert body["checks"]["partitions"]["assigned"] == ["reviews/0"]
    assert body["checks"]["model"]["version"] == "m-7"


async def test_readyz_is_not_ready_while_the_broker_does_not_acknowledge() -> None:
    state = Service()
    state.pipeline.source.assigned, state.model = [("reviews", 0)], "m-1"
    async with AdminServer(state.probe, "127.0.0.1", 0, stale_after_s=0.0) as admin:
        url = f"http://127.0.0.1:{admin.port}/readyz"
        state.probe.handed_over(0)  # a metrics message the broker has not acknowledged
        status, body = await get_json(url)
        assert (status, body["missing"]) == (503, ["broker"])
        state.probe.acknowledged(0)
        assert (await get_json(url))[0] == 200


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def feed(service: Service) -> None:
    feed_mixed(service.meter)
    service.meter.on_input()
    service.meter.on_labeled("large", 0.0, answer(90, 5, cached=True), 70, 3.0)
    service.pool.current = FakeStats(
        requests=4, retries=1, rate_limited=1, errors=1, timeouts=1, breaker_state="half_open",
        breaker_transitions=2, backlog=3, cost_usd=0.5,
    )  # fmt: skip
    service.pipeline.tracker.pending = 2
    service.pipeline.source.assigned = [("reviews", 0)]
    service.pipeline.source.high = {("reviews", 0): 40}
    service.pipeline.tracker.marks = {("reviews", 0): 38}
    service.model = "m-2"


async def test_metrics_parse_and_agree_with_the_meter(service: Service) -> None:
    feed(service)
    status, content_type, text = await get(service.base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = scrape(text)
    totals = service.meter.peek(service.pool.current)
    for name, attr, _ in COUNTERS:
        assert samples[(name + "_total", ())] == pytest.approx(getattr(totals, attr), rel=1e-12), name
    assert samples[("shunt_cost_usd_total", ())] == totals.cost_usd
    for path in LATENCY_PATHS:
        labels = (("source", path),)
        assert samples[("shunt_reviews_labeled_total", labels)] == getattr(totals, path)
        assert samples[("shunt_latency_seconds_count", (("path", path),))] == getattr(totals, path)
    assert samples[("shunt_dlq_total", (("reason", "invalid_json"),))] == 1
    assert samples[("shunt_shunt_rate", ())] == pytest.approx(2 / 3)
    assert samples[("shunt_cost_ratio", ())] == pytest.approx(totals.cost_usd / totals.baseline_cost_usd)
    assert samples[("shunt_breaker_state", (("state", "half_open"),))] == 1
    assert samples[("shunt_breaker_state", (("state", "closed"),))] == 0
    assert samples[("shunt_breaker_transitions_total", ())] == 2
    assert samples[("shunt_llm_timeouts_total", ())] == 1
    assert samples[("shunt_llm_billed_usd_total", ())] == 0.5
    assert samples[("shunt_queue_depth", (("queue", "llm_backlog"),))] == 3
    assert samples[("shunt_queue_depth", (("queue", "in_flight"),))] == 2
    assert samples[("shunt_consumer_lag", (("partition", "0"), ("topic", "reviews")))] == 2
    assert samples[("shunt_router_threshold", ())] == 0.9
    info = [k for k in samples if k[0] == "shunt_service_info"]
    assert dict(info[0][1])["model_version"] == "m-2" and dict(info[0][1])["instance_id"] == "inst-1"


async def test_latency_histogram_is_cumulative_in_seconds(service: Service) -> None:
    for ms in (0.5, 3.0, 3.0, 70.0, 200_000.0):
        service.meter.on_labeled("small", 0.0, None, 50, ms)
    samples = scrape((await get(service.base + "/metrics"))[2])

    def bucket(le: str) -> float:
        return samples[("shunt_latency_seconds_bucket", (("le", le), ("path", "small")))]

    assert (bucket("0.001"), bucket("0.005"), bucket("0.1"), bucket("120.0"), bucket("+Inf")) == (1, 3, 4, 4, 5)
    assert samples[("shunt_latency_seconds_sum", (("path", "small"),))] == pytest.approx(200.0765)


async def test_metrics_use_a_private_registry(service: Service) -> None:
    feed(service)
    await get(service.base + "/metrics")
    assert not [f for f in REGISTRY.collect() if f.name.startswith("shunt_")]


async def test_scrapes_are_monotonic_and_do_not_close_the_window(service: Service) -> None:
    feed(service)
    first = scrape((await get(service.base + "/metrics"))[2])
    feed(service)
    second = scrape((await get(service.base + "/metrics"))[2])
    for key, value in first.items():
        if key[0].endswith(("_total", "_count")):
            assert second[key] >= value, key
    window, _ = service.probe.close_window()
    assert window.window.reviews_in == 8  # the scrapes took nothing from the window
