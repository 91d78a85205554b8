"""Acceptance (issue 6): from the metrics topic alone, tell exactly what the stream cost, what it would have cost,
and how the shunt behaved; and ``/metrics`` agrees with it.

The real service runs over generated reviews plus a few bad ones, against the real broker and the stand-in
LLM over real HTTP; the test scrapes ``/metrics`` and ``/readyz`` while it runs. A second, faster test drives
:func:`consumer.observe.wiring.observability` itself over fakes and a real topic.
"""

from __future__ import annotations

import itertools
import math
import signal
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from consumer import contracts
from consumer.kafka.sink import KafkaSink
from consumer.observe.http import COUNTERS
from consumer.observe.meter import LATENCY_PATHS, Meter
from consumer.observe.wiring import observability
from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.service import free_port, start_service, start_standin
from tests.unit.observe.fakes import (
    DEFAULT_COMPLETION,
    PRICE,
    FakePipeline,
    FakePool,
    eventually,
    feed_mixed,
    make_settings,
)
from tests.unit.observe.test_http import scrape

pytestmark = pytest.mark.kafka
BAD: list[tuple[bytes | None, str]] = [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe broken", "invalid_utf8"),
    (orjson.dumps({"text": "a review without an id"}), "schema_violation"),
    (orjson.dumps({"id": "blank", "text": "   "}), "empty_text"),
    (None, "null_value"),
]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def reviews() -> list[dict[str, Any]]:
    return [r.as_dict() for r in generate(300, seed=11, hard_share=0.3)]


@pytest.fixture
def standin(tmp_path: Path, reviews: list[dict[str, Any]]) -> Iterator[str]:
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(b"".join(orjson.dumps({"text": r["text"], "label": r["label"]}) + b"\n" for r in reviews))
    proc, url = start_standin(
        tmp_path / "standin.log", "--policy", "oracle", "--labels", str(labels), "--accuracy", "0.95",
        "--latency-ms", "5-30", "--rpm", "100000", "--tpm", "100000000",
    )  # fmt: skip
    yield url
    proc.kill()


def http_get(url: str) -> tuple[int, bytes] | None:
    """Status and body, or None while the server is not there (starting or stopped)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # a loopback test URL
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None


class Watcher:
    """Scrapes /readyz and /metrics of the running service; keeps every successful scrape."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.ready: list[int] = []
        self.scrapes: list[Samples] = []

    def readyz(self) -> bool:
        answer = http_get(self.base + "/readyz")
        if answer is not None:
            self.ready.append(answer[0])
        return answer is not None and answer[0] == 200

    def drained(self, expected: int) -> bool:
        """A scrape where every input became a label or a dead letter and nothing is in flight."""
        answer = http_get(self.base + "/metrics")
        if answer is None:
            return False
        samples = scrape(answer[1].decode())
        self.scrapes.append(samples)
        done = sum(v for (name, _), v in samples.items() if name in ("shunt_reviews_labeled_total", "shunt_dlq_total"))
        in_flight = samples[("shunt_queue_depth", (("queue", "in_flight"),))]
        return samples[("shunt_reviews_in_total", ())] == expected == done and in_flight == 0


def check_stream(final: dict[str, Any], outputs: list[dict[str, Any]], dead: list[dict[str, Any]]) -> None:
    """The final totals are exactly what the output and DLQ topics hold."""
    totals = final["totals"]
    assert totals["reviews_in"] == totals["labeled"] + totals["dlq"]
    assert totals["labeled"] == len(outputs) and totals["dlq"] == len(dead)
    sources = Counter(o["source"] for o in outputs)
    assert (totals["small"], totals["large"], totals["fallback"]) == (sources["small"], sources["large"],
                                                                      sources["fallback"])  # fmt: skip
    assert totals["dlq_by_reason"] == dict(Counter(d["reason"] for d in dead))
    answered = [o["llm"] for o in outputs if o["llm"] is not None]
    assert totals["cache_hits"] == sum(a["cached"] for a in answered)
    assert totals["prompt_tokens"] == sum(a["prompt_tokens"] for a in answered if not a["cached"])
    assert totals["completion_tokens"] == sum(a["completion_tokens"] for a in answered if not a["cached"])
    audits = final["loop"]["totals"]["audit_cost_usd"]  # shadow requests are money spent too (issue 19)
    spent = math.fsum([*(o["cost_usd"] for o in outputs), audits])
    assert round(totals["cost_usd"], 2) == round(spent, 2)
    assert abs(totals["cost_usd"] - spent) < 1e-9


def check_ratios(final: dict[str, Any]) -> None:
    totals = final["totals"]
    assert totals["baseline_cost_usd"] > totals["cost_usd"] > 0
    assert final["cost_ratio"] == pytest.approx(totals["cost_usd"] / totals["baseline_cost_usd"], rel=1e-9)
    assert 0 < final["cost_ratio"] < 1
    shunted = (totals["large"] + totals["fallback"]) / totals["labeled"]
    assert final["shunt_rate"] == pytest.approx(shunted, rel=1e-12)
    assert final["breaker_state"] == "closed" and final["llm_model"] == "standin"
    assert final["latency_ms"].keys() >= set(LATENCY_PATHS) and final["threshold"] == 0.97


def check_windows(messages: list[dict[str, Any]], instance_id: str) -> dict[str, Any]:
    """Every message is valid, in sequence, one final at the end, and the windows add up to it."""
    for message in messages:
        contracts.validate("metrics", message)
    assert {m["instance_id"] for m in messages} == {instance_id}
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert [m["final"] for m in messages] == [False] * (len(messages) - 1) + [True]
    final = messages[-1]
    for name in ("reviews_in", "labeled", "small", "large", "fallback", "dlq", "cache_hits", "llm_requests"):
        assert sum(m["window"][name] for m in messages) == final["totals"][name], name
    assert math.fsum(m["window"]["cost_usd"] for m in messages) == pytest.approx(final["totals"]["cost_usd"])
    return final


def check_scrape_agrees(samples: Samples, final: dict[str, Any]) -> None:
    totals = final["totals"]
    for name, attr, _ in COUNTERS:
        assert abs(samples[(name + "_total", ())] - totals[attr]) < 1e-9, name
    for path in LATENCY_PATHS:
        assert samples[("shunt_reviews_labeled_total", (("source", path),))] == totals[path]
        assert samples[("shunt_latency_seconds_count", (("path", path),))] == totals[path]
    for reason, count in totals["dlq_by_reason"].items():
        assert samples[("shunt_dlq_total", (("reason", reason),))] == count
    assert samples[("shunt_shunt_rate", ())] == pytest.approx(final["shunt_rate"], rel=1e-12)
    assert samples[("shunt_cost_ratio", ())] == pytest.approx(final["cost_ratio"], rel=1e-9)
    assert samples[("shunt_breaker_state", (("state", final["breaker_state"]),))] == 1
    # nothing was abandoned or failed: what the LLM billed is what the labels say they cost
    assert abs(samples[("shunt_llm_billed_usd_total", ())] - totals["cost_usd"]) < 1e-9


def check_monotonic(scrapes: list[Samples]) -> None:
    for earlier, later in itertools.pairwise(scrapes):
        for key, value in earlier.items():
            if key[0].endswith(("_total", "_count")) and key in later:
                assert later[key] >= value, key


def test_the_metrics_topic_tells_what_the_stream_cost(
    topics: kafka.Topics, tmp_path: Path, reviews: list[dict[str, Any]], standin: str
) -> None:
    source, output, dlq = topics.make("in", partitions=3), topics.make("out"), topics.make("dlq")
    distill, metrics = topics.make("distill"), topics.make("metrics")
    kafka.produce_reviews(source, reviews)
    kafka.produce(source, [value for value, _ in BAD])
    expected, port, instance_id = len(reviews) + len(BAD), free_port(), kafka.unique("inst")
    proc = start_service(
        tmp_path / "service.log",
        topics__input=source, topics__output=output, topics__dlq=dlq, topics__distill=distill,
        topics__metrics=metrics, kafka__group_id=kafka.unique("g"), router__threshold=0.97, llm__base_url=standin,
        llm__rpm=100_000, llm__tpm=100_000_000, metrics__interval_s=1, metrics__instance_id=instance_id,
        admin__port=port,
    )  # fmt: skip
    watcher = Watcher(port)
    try:
        kafka.wait_for(lambda: watcher.readyz() or proc.proc.poll() is not None, 90, "/readyz says ready", 0.1)
        kafka.wait_for(lambda: watcher.drained(expected) or proc.proc.poll() is not None, 120, "drained", 0.1)
        proc.signal(signal.SIGTERM)  # everything is done: the final window must agree with the last scrape
        code = proc.wait(60)
    finally:
        proc.kill()
    log = proc.log_path.read_text(errors="replace")
    assert code == 0, log[-4000:]
    assert watcher.ready[-1] == 200 and watcher.scrapes, log[-4000:]
    listening = [e for e in map(_json_line, log.splitlines()) if e.get("event") == "admin_listening"]
    assert [e["port"] for e in listening] == [port]
    found = kafka.read_until(metrics, lambda ms: any(orjson.loads(m.value())["final"] for m in ms), 60)
    final = check_windows([orjson.loads(m.value()) for m in found], instance_id)
    assert final["totals"]["reviews_in"] == expected and final["totals"]["dlq"] == len(BAD)
    outputs, dead = kafka.read_json(output, final["totals"]["labeled"]), kafka.read_json(dlq, len(BAD))
    assert {o["id"] for o in outputs} == {r["id"] for r in reviews}
    check_stream(final, outputs, dead)
    check_ratios(final)
    check_scrape_agrees(watcher.scrapes[-1], final)
    check_monotonic(watcher.scrapes)


def _json_line(line: str) -> dict[str, Any]:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


def obs_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/readyz"


async def test_observability_starts_admin_and_emitter_and_ends_with_a_final_window(topics: kafka.Topics) -> None:
    topic = topics.make("metrics")
    settings = make_settings(topic, interval_s=0.1)
    sink = KafkaSink(settings.kafka)
    await sink.start()
    meter, pool, pipeline = Meter(PRICE, DEFAULT_COMPLETION), FakePool(), FakePipeline()
    pipeline.source.assigned = [("reviews", 0)]
    try:
        async with observability(settings, meter, pipeline, pool, sink, model_version=lambda: "m-9") as obs:
            assert obs.admin is not None and obs.admin.port > 0
            feed_mixed(meter)
            await eventually(lambda: obs.emitter.seq >= 2, what="two windows")
            async with aiohttp.ClientSession() as session, session.get(obs_url(obs.admin.port)) as response:
                assert response.status == 200
    finally:
        await sink.close(10)
    messages = kafka.read_json(topic, obs.emitter.seq)
    assert messages[-1]["final"] and messages[-1]["totals"]["reviews_in"] == 3
    assert messages[-1]["model_version"] == "m-9"


async def test_observability_without_the_admin_server(topics: kafka.Topics) -> None:
    topic = topics.make("metrics")
    settings = make_settings(topic, interval_s=5, admin={"enabled": False})
    sink = KafkaSink(settings.kafka)
    await sink.start()
    try:
        async with observability(
            settings, Meter(PRICE, DEFAULT_COMPLETION), FakePipeline(), FakePool(), sink, model_version=lambda: None
        ) as obs:
            assert obs.admin is None
    finally:
        await sink.close(10)
    (only,) = kafka.read_json(topic, 1)
    assert only["final"] and only["seq"] == 0 and only["model_version"] == "unknown"
