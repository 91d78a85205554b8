"""``shunt demo``: the embedded broker's lifecycle, the tally, and the whole demo as a subprocess.

The subprocess tests need no external Kafka: the demo starts its own broker. They check the summary is
plausible and, afterwards, that nothing the demo started is still running, also after a SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.aio import wait_until
from consumer.config import KafkaConfig, PriceConfig
from consumer.kafka.admin import TopicAdmin
from consumer.kafka.sink import KafkaSink, Outgoing
from consumer.llm.prompting import estimate_prompt_tokens
from consumer.observe.meter import Meter
from consumer.sandbox.demo import (
    DemoOptions,
    OutputReader,
    RunInfo,
    Tally,
    Topics,
    create_topics,
    delete_run,
    make_truth,
    summarise,
)
from consumer.sandbox.embedded_broker import EmbeddedBroker, find_tansu
from consumer.sandbox.reviewgen import generate
from consumer.sandbox.standin import Policy
from tests.support.paths import ROOT


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
        time.sleep(0.05)  # polling a condition, with a deadline


def gone(pid: int, created: float) -> bool:
    """The process has ended (or its pid now belongs to someone else)."""
    try:
        proc = psutil.Process(pid)
        return bool(proc.create_time() != created or proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def tansu_listening_on(port: int) -> list[psutil.Process]:
    """Any Tansu process whose command line names this port."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "tansu" in cmdline and f":{port}" in cmdline:
            found.append(proc)
    return found


# -- the embedded broker ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_embedded_broker_starts_answers_and_stops() -> None:
    assert find_tansu().is_file()
    with EmbeddedBroker() as broker:
        assert broker.pid is not None
        pid, port = broker.pid, broker.port
        created = psutil.Process(pid).create_time()
        assert os.getpgid(pid) == pid, "its own process group, so a terminal Ctrl-C reaches only the demo"
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        assert admin.list_topics(timeout=10).brokers
    assert gone(pid, created)
    assert not tansu_listening_on(port)


@pytest.mark.timeout(60)
def test_embedded_broker_dies_with_a_parent_killed_without_cleanup(tmp_path: Path) -> None:
    script = "import time\nfrom consumer import logs\nfrom consumer.sandbox.embedded_broker import EmbeddedBroker\n"
    script += "logs.configure('warning')\nb = EmbeddedBroker()\nb.start()\nprint(b.pid, flush=True)\ntime.sleep(120)\n"
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        created = psutil.Process(pid).create_time()
    finally:
        parent.kill()  # SIGKILL: no atexit, no finally; only the kernel's parent-death signal is left
        parent.wait(timeout=30)
        if parent.stdout is not None:
            parent.stdout.close()
    wait_for(lambda: gone(pid, created), 10, "the broker died with its parent")


# -- the tally (no broker) -------------------------------------------------------------------------------
class WrongOnHard:
    """An oracle stand-in: right except on hard reviews."""

    def __init__(self, truth: dict[str, tuple[str, bool]]) -> None:
        self._truth = truth

    def answer(self, text: str, review_id: str | None, allowed: Any) -> str | None:
        label, hard = self._truth[str(review_id)]
        return ("positive" if label == "negative" else "negative") if hard else label


def labeled(review_id: str, label: str, small: str, source: str, cost: float = 0.0) -> dict[str, Any]:
    llm = None
    if source == "large":
        llm = {"model": "standin", "label": label, "prompt_tokens": 100, "completion_tokens": 5, "cost_usd": cost,
               "latency_ms": 300.0, "cached": False, "attempts": 1, "prompt_version": "s4l-v1"}  # fmt: skip
    return {"id": review_id, "label": label, "source": source, "small": {"label": small, "confidence": 0.6},
            "llm": llm, "cost_usd": cost, "latency_ms": 20.0, "model_version": "m1", "threshold": 0.9}  # fmt: skip


def test_tally_scores_each_path_against_the_truth_and_counts_a_duplicate_once() -> None:
    reviews = list(generate(4, seed=3, prefix="t"))
    policy: Policy = WrongOnHard({r.id: (r.label, False) for r in reviews})
    meter = Meter(PriceConfig(input_per_mtok=1.0, output_per_mtok=2.0), 20)
    tally = Tally(make_truth(reviews, policy), meter)
    a, b, c, d = reviews
    wrong = {"positive": "negative", "negative": "positive"}
    tally.on_labeled(labeled(a.id, a.label, a.label, "small"))
    tally.on_labeled(labeled(b.id, b.label, wrong[b.label], "large", cost=0.001))
    tally.on_labeled(labeled(b.id, b.label, wrong[b.label], "large", cost=0.001))  # a redelivery
    tally.on_labeled(labeled(c.id, wrong[c.label], wrong[c.label], "fallback"))
    tally.on_labeled(labeled(d.id, d.label, d.label, "small"))
    assert (tally.labelled, tally.duplicates) == (4, 1)
    assert tally.correct == {"small": 2, "shunt": 3, "llm": 4}
    assert (tally.llm_checked, tally.llm_as_predicted) == (1, 1)
    assert meter.totals.cost_usd == pytest.approx(0.001)
    estimated = sum(estimate_prompt_tokens(r.text) for r in (a, c, d))
    assert meter.totals.baseline_cost_usd > (100 + estimated) / 1e6  # real tokens + estimates, as the meter


def test_summary_numbers_and_topic_names() -> None:
    reviews = list(generate(2, seed=1, prefix="t"))
    policy: Policy = WrongOnHard({r.id: (r.label, False) for r in reviews})
    tally = Tally(make_truth(reviews, policy), Meter(PriceConfig(input_per_mtok=1.0, output_per_mtok=1.0), 20))
    tally.on_labeled(labeled(reviews[0].id, reviews[0].label, reviews[0].label, "small"))
    tally.on_labeled(labeled(reviews[1].id, reviews[1].label, reviews[0].label, "large", cost=0.0002))
    run = RunInfo(DemoOptions(reviews=2), "abc", "127.0.0.1:1", True, Path("."))
    summary = summarise(tally, run, {"requests": 1, "rate_limited_sent": 0, "max_requests_in_any_60s_window": 1})
    assert summary.share_to_llm == 0.5
    assert summary.accuracy == {"small": 0.5, "llm": 1.0, "shunt": 1.0}
    money = summary.money
    assert money.source == "outputs" and 0 < money.spend_usd < money.baseline_usd
    assert money.savings_usd == pytest.approx(money.baseline_usd - money.spend_usd)
    topics = Topics.for_run("abc")
    assert (topics.input, topics.output) == ("demo-abc.reviews", "demo-abc.reviews.labeled")
    assert topics.partitions(3)[topics.input] == 3 and topics.partitions(3)[topics.dlq] == 1
    assert DemoOptions.small().reviews == 300 and DemoOptions.small(reviews=50).reviews == 50


# -- the run's topics and the output reader, on the shared broker ---------------------------------------
async def publish(sink: KafkaSink, messages: list[tuple[str, bytes]]) -> None:
    """Publish and wait until the broker has every message."""
    delivered: list[None] = []
    for topic, value in messages:
        await sink.publish(Outgoing(topic, None, value), lambda: delivered.append(None))
    assert await wait_until(lambda: len(delivered) == len(messages), 30), "the broker took every message"


@pytest.mark.timeout(90)
async def test_the_output_reader_follows_the_topics_and_catches_up_to_what_came_later(kafka_bootstrap: str) -> None:
    run_id = uuid.uuid4().hex[:8]
    topics, admin = Topics.for_run(run_id), TopicAdmin({"bootstrap.servers": kafka_bootstrap})
    partitions = topics.partitions(2)
    await asyncio.to_thread(create_topics, kafka_bootstrap, partitions)
    try:
        assert all(admin.partitions(name) == count for name, count in partitions.items())
        reviews = list(generate(4, seed=5, prefix="f"))
        tally = Tally(make_truth(reviews, WrongOnHard({r.id: (r.label, False) for r in reviews})),
                      Meter(PriceConfig(input_per_mtok=1.0, output_per_mtok=1.0), 20))  # fmt: skip
        out = [(topics.output, orjson.dumps(labeled(r.id, r.label, r.label, "small"))) for r in reviews]
        sink = KafkaSink(KafkaConfig(bootstrap_servers=kafka_bootstrap))
        await sink.start()
        try:
            await publish(sink, out[:1])  # before the reader opens: read from the start
            async with OutputReader(kafka_bootstrap, topics, tally) as reader:
                await publish(sink, out[1:2])  # after: it follows past the end it saw when it opened
                assert await wait_until(lambda: tally.labelled == 2, 30), "the reader followed past its first end"
                await publish(sink, [*out[2:], (topics.dlq, b'{"reason": "x"}'), (topics.metrics, b"not json")])
                assert await reader.catch_up(30)
                assert (tally.labelled, tally.dlq, tally.duplicates) == (4, 1, 0)
        finally:
            await sink.close(5)
    finally:
        await asyncio.to_thread(delete_run, kafka_bootstrap, list(partitions), f"demo-{run_id}")
    wait_for(lambda: all(admin.partitions(name) is None for name in partitions), 30, "the run's topics are gone")


# -- the whole demo, as a newcomer runs it ---------------------------------------------------------------
def demo_env() -> dict[str, str]:
    # Hermetic: no SHUNT_* settings from the developer's shell, except a model folder they point at.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHUNT_") or k == "SHUNT_MODEL__PATH"}
    return env | {"PYTHONUNBUFFERED": "1"}


class DemoProcess:
    """``shunt demo`` as a subprocess; remembers the Tansu child it starts, to check it is gone later."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.summary_path = tmp_path / "summary.json"
        self._out = (tmp_path / "stdout.txt").open("w+")
        self._err = (tmp_path / "stderr.txt").open("w+")
        command = [sys.executable, "-m", "consumer", "demo", "--summary-json", str(self.summary_path), *args]
        self.proc = subprocess.Popen(command, env=demo_env(), cwd=ROOT, stdout=self._out, stderr=self._err)
        self.broker: tuple[int, float, int] | None = None  # pid, create time, port

    def find_broker(self, timeout_s: float = 60) -> tuple[int, float, int]:
        def found() -> bool:
            assert self.proc.poll() is None, self.output()
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with_port = [a for a in child.cmdline() if a.startswith("tcp://")]
                if "tansu" in child.name() and with_port:
                    self.broker = (child.pid, child.create_time(), int(with_port[0].rsplit(":", 1)[1]))
                    return True
            return False

        wait_for(found, timeout_s, "the demo started its broker")
        assert self.broker is not None
        return self.broker

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def output(self) -> str:
        self._out.flush()
        self._err.flush()
        return Path(self._out.name).read_text() + "\n--- stderr ---\n" + Path(self._err.name).read_text()

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.summary_path.read_bytes())
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._out.close()
        self._err.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Callable[..., DemoProcess]]:
    started: list[DemoProcess] = []

    def start(*args: str) -> DemoProcess:
        started.append(DemoProcess(tmp_path, *args))
        return started[-1]

    yield start
    for process in started:
        process.close()


def assert_nothing_left(process: DemoProcess) -> None:
    assert process.broker is not None
    pid, created, port = process.broker
    assert gone(pid, created), "the broker outlived the demo"
    assert not tansu_listening_on(port)


@pytest.mark.timeout(240)
def test_demo_small_runs_to_a_plausible_summary_and_leaves_nothing_running(
    demo: Callable[..., DemoProcess],
) -> None:
    process = demo("--small")
    process.find_broker()
    code = process.wait(200)
    output = process.output()
    assert code == 0, output
    assert "shunt demo: summary" in output and "accuracy: the shunt" in output
    s = process.summary()
    assert (s["labelled"], s["produced"], s["interrupted"], s["complete"]) == (300, 300, False, True), s
    assert 0 < s["share_to_llm"] < 1
    assert s["accuracy"]["shunt"] >= s["accuracy"]["small"] - 0.01
    assert 0.85 <= s["accuracy"]["llm"] <= 1.0
    assert s["llm_as_predicted"] == s["llm_checked"] > 0, "the stand-in answered online as the oracle offline"
    money = s["money"]
    assert 0 < money["spend_usd"] < money["baseline_usd"]
    assert money["outputs_spend_usd"] == pytest.approx(money["spend_usd"]), "the outputs reconcile with the meter"
    assert s["llm_peak_per_minute"] <= s["llm_rpm"]
    assert money["savings_usd"] == pytest.approx(money["baseline_usd"] - money["spend_usd"])
    assert s["latency_ms"]["all"]["p50"] is not None and s["latency_ms"]["large"]["count"] > 0
    assert_nothing_left(process)


def output_watermark(port: int) -> int:
    """Messages on the demo's output topic so far (0 until it exists)."""
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})
    names = [t for t in admin.list_topics(timeout=5).topics if t.endswith(".reviews.labeled")]
    if not names:
        return 0
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "test-demo-watch"})
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(names[0], p), timeout=5)[1] for p in range(3))
    finally:
        consumer.close()


@pytest.mark.timeout(240)
def test_sigint_during_the_demo_stops_it_cleanly_with_a_summary(demo: Callable[..., DemoProcess]) -> None:
    process = demo("--reviews", "3000", "--rate", "50")
    _, _, port = process.find_broker()
    wait_for(lambda: output_watermark(port) >= 50, 120, "the service has labelled some reviews")
    process.proc.send_signal(signal.SIGINT)
    code = process.wait(60)
    output = process.output()
    assert code == 0, output
    assert "summary (interrupted)" in output
    s = process.summary()
    assert s["interrupted"] is True
    assert 50 <= s["labelled"] < 3000
    assert_nothing_left(process)


@pytest.mark.timeout(240)
def test_demo_drift_and_budget_show_the_closed_loop(demo: Callable[..., DemoProcess]) -> None:
    process = demo("--small", "--drift", "--budget", "0.5", "--reviews", "600")
    process.find_broker()
    code = process.wait(200)
    output = process.output()
    assert code == 0, output
    assert "closed loop" in output and "audits" in output and "spend cap" in output
    s = process.summary()
    loop, money = s["loop"], s["money"]
    assert s["labelled"] == 600 and loop["mode"] == "adaptive" and loop["totals"]["audits"] > 0
    assert loop["budget"]["usd_per_hour"] == 0.5 and loop["budget"]["priority"] == "spend"
    assert 0 < money["audit_usd"] < money["spend_usd"]
    assert money["outputs_spend_usd"] == pytest.approx(money["spend_usd"]), "the outputs and audits reconcile"
    allowance = 0.5 * (s["wall_s"] + 2.0) / 3600  # the whole run, and one metrics window more
    assert money["spend_usd"] <= allowance + 0.001, (money, allowance)
    assert_nothing_left(process)
