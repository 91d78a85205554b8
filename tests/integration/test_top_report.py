"""``shunt top`` in a pseudo-terminal and ``shunt report`` against a metrics topic filled with real metrics.v1
messages (built by the real meter and emitter): the numbers they show are the sums they should be."""

from __future__ import annotations

import fcntl
import math
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from consumer import contracts
from consumer.commands.render import percent, usd
from consumer.observe.emitter import MetricsEmitter
from consumer.observe.meter import Meter
from consumer.observe.probe import Probe, ServiceInfo
from consumer.observe.reading import MetricsReader
from tests.support import kafka
from tests.unit.observe.fakes import (
    DEFAULT_COMPLETION,
    PRICE,
    FakePipeline,
    FakePool,
    FakeSink,
    FakeStats,
    apply,
    make_settings,
)

pytestmark = pytest.mark.kafka
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")
WINDOW_MS = 10_000


@dataclass
class Run:
    """One process lifetime of an instance: the metrics messages it published."""

    instance_id: str
    group: str
    messages: list[dict[str, Any]]


async def run_instance(
    instance_id: str, group: str, windows: list[list[tuple[Any, ...]]], *, final: bool, end_ms: int
) -> Run:
    """Drive the real meter and emitter over ``windows`` of events; windows are WINDOW_MS long ending at end_ms."""
    settings = make_settings(metrics={"instance_id": instance_id}, kafka={"group_id": group})
    meter, pool, pipeline = Meter(PRICE, DEFAULT_COMPLETION), FakePool(), FakePipeline()
    pipeline.source.assigned = [("reviews", len(group))]
    pipeline.source.high = {("reviews", len(group)): 100}
    probe = Probe(ServiceInfo.from_settings(settings), meter, pipeline, pool, FakeSink(), model_version=lambda: "m-3")
    emitter = MetricsEmitter(probe, "unused", WINDOW_MS / 1000)
    messages = []
    for i, events in enumerate(windows):
        for event in events:
            apply(meter, event)
        pool.current = FakeStats(requests=pool.current.requests + 2, retries=i, breaker_state="closed")
        pipeline.tracker.marks = {("reviews", len(group)): 90 + i}
        messages.append(await emitter.emit(final=final and i == len(windows) - 1))
    for i, message in enumerate(messages):
        message["window_end_ms"] = end_ms - (len(messages) - 1 - i) * WINDOW_MS
        message["window_start_ms"] = message["window_end_ms"] - WINDOW_MS
        contracts.validate("metrics", message)
    return Run(instance_id, group, messages)


def money(value: float) -> str:
    """Spend as ``top`` and ``report`` print it."""
    return usd(value, 6)


def events(small: int, large: int, fallback: int = 0, dlq: int = 0) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [("small", 60 + i) for i in range(small)]
    out += [("large", 100 + i, 4 + i % 3) for i in range(large)]
    out += [("fallback", 80, 1e-6) for _ in range(fallback)]
    return out + [("dlq", "invalid_json") for _ in range(dlq)]


def publish(topic: str, runs: list[Run], timestamp_ms: int | None = None) -> None:
    producer = Producer({"bootstrap.servers": kafka.bootstrap()})
    for run in runs:
        for message in run.messages:
            producer.produce(topic, orjson.dumps(message), key=run.instance_id, timestamp=timestamp_ms or 0)
    assert producer.flush(30) == 0


@dataclass
class Fleet:
    topic: str
    runs: list[Run]

    def latest_totals(self, group: str) -> dict[str, Any]:
        """What top should show: the final totals of finished runs plus the latest of running ones."""
        totals: dict[str, Any] = {}
        for run in self.runs:
            if run.group == group:
                for key, value in run.messages[-1]["totals"].items():
                    if key != "dlq_by_reason":
                        totals[key] = totals.get(key, 0) + value
        return totals


@pytest.fixture
async def fleet(topics: kafka.Topics) -> Fleet:
    topic = topics.make("metrics", partitions=2)
    now = time.time_ns() // 1_000_000
    runs = [
        await run_instance("a", "g-a", [events(40, 10), events(30, 20, 1, 2), events(50, 5)], final=False, end_ms=now),
        await run_instance("b", "g-a", [events(10, 10, 0, 1), events(5, 5)], final=True, end_ms=now - 60_000),
        await run_instance("b", "g-a", [events(20, 4)], final=False, end_ms=now),  # b restarted: seq 0 again
        await run_instance("c", "g-other", [events(1, 300)], final=False, end_ms=now),
    ]
    publish(topic, runs)
    return Fleet(topic, runs)


# -- pseudo-terminal ------------------------------------------------------------------------------------------
def shunt(*args: str) -> list[str]:
    return [sys.executable, "-m", "consumer", *args]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHUNT_", "NO_COLOR", "FORCE_COLOR"))}
    return env | {"TERM": "xterm-256color", "COLUMNS": "150", "LINES": "60"}


class Terminal:
    """A child process on a pseudo-terminal of a fixed size; collects everything it draws."""

    def __init__(self, args: list[str], rows: int = 60, cols: int = 150) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=child_env())
        os.close(slave)
        self._master = master
        self.raw = b""

    def read_until(self, condition: Callable[[str], bool], timeout_s: float) -> bool:
        """Read output until ``condition(screen text)`` holds or the child closes the terminal."""
        deadline = time.monotonic() + timeout_s
        while not condition(self.text()) and time.monotonic() < deadline:
            ready, _, _ = select.select([self._master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self._master, 65536)
                except OSError:  # EIO: the child closed its side
                    return condition(self.text())
                if not chunk:
                    break
                self.raw += chunk
        return condition(self.text())

    def finish(self, timeout_s: float) -> int:
        self.read_until(lambda _: self.proc.poll() is not None, timeout_s)
        self.read_until(lambda _: False, 0.5)  # whatever is left in the terminal buffer
        code = self.proc.wait(timeout=timeout_s)
        os.close(self._master)
        return code

    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", errors="replace"))

    def last_frame(self) -> str:
        text = self.text()
        return text[text.rfind("shunt top") :]


def expected_top_values(fleet: Fleet) -> list[str]:
    totals = fleet.latest_totals("g-a")
    shunted = (totals["large"] + totals["fallback"]) / totals["labeled"]
    savings = totals["baseline_cost_usd"] - totals["cost_usd"]
    live_latest = [r.messages[-1] for r in fleet.runs if r.group == "g-a" and not r.messages[-1]["final"]]
    rate = sum(m["window"]["reviews_in"] for m in live_latest) / (WINDOW_MS / 1000)
    return [
        f"{rate:,.1f} reviews/s",
        f"{totals['reviews_in']:,} in, {totals['labeled']:,} labeled, {totals['dlq']:,} dlq",
        percent(shunted),
        money(totals["cost_usd"]),
        money(totals["baseline_cost_usd"]),
        f"{money(savings)} ({savings / totals['baseline_cost_usd'] * 100:.1f}%)",
        percent(totals["cost_usd"] / totals["baseline_cost_usd"]),
        "instances 2 live / 2",
        "closed",
        "threshold 0.9, model m-3, prompt s4l-v2, llm standin",
    ]


def test_top_renders_the_group_totals_live_in_a_terminal(fleet: Fleet) -> None:
    term = Terminal(shunt("top", "--bootstrap", kafka.bootstrap(), "--topic", fleet.topic, "--group-filter", "g-a",
                          "--duration", "3", "--refresh", "0.3"))  # fmt: skip
    code = term.finish(60)
    screen = term.last_frame()
    assert code == 0, term.text()[-3000:]
    for value in expected_top_values(fleet):
        assert value in screen, (value, screen)
    assert " c " not in screen and "g-other" not in screen
    assert re.search(rb"\x1b\[\d*A", term.raw), "the view redraws in place (cursor up)"
    assert screen.count("shunt top") == 1


def test_top_exits_cleanly_on_ctrl_c(fleet: Fleet) -> None:
    term = Terminal(shunt("top", "--bootstrap", kafka.bootstrap(), "--topic", fleet.topic, "--refresh", "0.2"))
    assert term.read_until(lambda text: "instances 3 live / 3" in text, 60), term.text()[-3000:]
    term.proc.send_signal(signal.SIGINT)
    assert term.finish(30) == 0, term.text()[-3000:]
    assert "Traceback" not in term.text()


def test_top_once_prints_one_view(fleet: Fleet) -> None:
    done = subprocess.run(
        shunt("top", "--bootstrap", kafka.bootstrap(), "--topic", fleet.topic, "--group-filter", "g-a", "--once"),
        capture_output=True, env=child_env(), timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    for value in expected_top_values(fleet):
        assert value in out, (value, out)


# -- report ---------------------------------------------------------------------------------------------------
def report_json(topic: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        shunt("report", "--bootstrap", kafka.bootstrap(), "--topic", topic, "--json", *args),
        capture_output=True, env=child_env(), timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    data: dict[str, Any] = orjson.loads(done.stdout)
    return data


def window_sums(runs: list[Run]) -> dict[str, Any]:
    sums: dict[str, Any] = {"dlq_by_reason": {}}
    for run in runs:
        for message in run.messages:
            for key, value in message["window"].items():
                if key == "dlq_by_reason":
                    for reason, n in value.items():
                        sums[key][reason] = sums[key].get(reason, 0) + n
                else:
                    sums.setdefault(key, []).append(value)
    return {k: v if k == "dlq_by_reason" else (math.fsum(v) if isinstance(v[0], float) else sum(v))
            for k, v in sums.items()}  # fmt: skip


def test_report_json_sums_every_window_of_the_period(fleet: Fleet) -> None:
    data = report_json(fleet.topic, "--since", "1h")
    expected = window_sums(fleet.runs)
    totals = data["totals"]
    for key, value in expected.items():
        assert totals[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert totals["reviews_in"] == totals["labeled"] + totals["dlq"]
    # windows add up to what the instances' latest totals say (every run is on the topic)
    latest = sum(r.messages[-1]["totals"]["cost_usd"] for r in fleet.runs)
    assert abs(data["cost_usd"] - latest) < 1e-9 and round(data["cost_usd"], 2) == round(latest, 2)
    assert data["shunt_rate"] == pytest.approx((totals["large"] + totals["fallback"]) / totals["labeled"])
    assert data["cost_ratio"] == pytest.approx(totals["cost_usd"] / totals["baseline_cost_usd"])
    assert data["savings_usd"] == pytest.approx(totals["baseline_cost_usd"] - totals["cost_usd"])
    assert data["messages"] == sum(len(r.messages) for r in fleet.runs)
    assert data["instances"] == ["a", "b", "c"] and data["groups"] == ["g-a", "g-other"]
    assert data["latency_ms"]["large"]["count"] == totals["large"]
    assert data["breaker_state"] == "closed" and data["lag_total"] == sum(data["lag"].values()) > 0
    assert data["configs"] == ["threshold 0.9, model m-3, prompt s4l-v2, llm standin"]


def test_report_reads_from_the_since_offset_and_filters_groups(fleet: Fleet, topics: kafka.Topics) -> None:
    topic, now_ms = topics.make("metrics"), time.time_ns() // 1_000_000
    old = [Run("old", "g-a", [dict(fleet.runs[0].messages[0], instance_id="old")])]
    publish(topic, old, timestamp_ms=now_ms - 2 * 3_600_000)
    publish(topic, fleet.runs)
    publish(topic, [Run("late", "g-a", old[0].messages)], timestamp_ms=now_ms - 3 * 3_600_000)  # written late
    recent = report_json(topic, "--since", "1h", "--group-filter", "g-a")
    assert recent["instances"] == ["a", "b"]
    assert recent["totals"]["reviews_in"] == window_sums([r for r in fleet.runs if r.group == "g-a"])["reviews_in"]
    wider = report_json(topic, "--since", "150m", "--group-filter", "g-*")
    assert wider["instances"] == ["a", "b", "c", "old"]
    assert wider["totals"]["reviews_in"] == window_sums([*fleet.runs, *old])["reviews_in"]
    assert report_json(topic, "--since", "1s")["messages"] == 0


def test_report_prints_a_table_for_humans(fleet: Fleet) -> None:
    done = subprocess.run(
        shunt("report", "--bootstrap", kafka.bootstrap(), "--topic", fleet.topic, "--since", "1h"),
        capture_output=True, env=child_env(), timeout=60, check=False,
    )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert money(window_sums(fleet.runs)["cost_usd"]) in out and "shunt rate" in out and "p99" in out


# -- the reader -----------------------------------------------------------------------------------------------
def test_the_reader_counts_what_is_not_metrics_v1_and_filters_groups(fleet: Fleet) -> None:
    producer = Producer({"bootstrap.servers": kafka.bootstrap()})
    for junk in (b"not json", b'{"schema_version": "metrics.v1"}', b"[1, 2]"):
        producer.produce(fleet.topic, junk, key=b"junk")
    assert producer.flush(30) == 0
    settings = make_settings(fleet.topic)
    with MetricsReader.from_settings(settings, group_filter="g-a") as reader:
        read = list(reader.read_all())
        assert reader.caught_up() and reader.skipped == 3
    expected = [m for run in fleet.runs if run.group == "g-a" for m in run.messages]
    assert sorted((m["instance_id"], m["seq"], m["window_end_ms"]) for m in read) == sorted(
        (m["instance_id"], m["seq"], m["window_end_ms"]) for m in expected
    )
    assert report_json(fleet.topic, "--since", "1h")["skipped"] == 3


def test_report_on_a_missing_topic_is_a_one_line_error() -> None:
    missing = kafka.unique("no-such-metrics")
    done = subprocess.run(
        shunt("report", "--bootstrap", kafka.bootstrap(), "--topic", missing, "--json"),
        capture_output=True, env=child_env(), timeout=60, check=False,
    )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 1 and f"cannot read topic {missing!r}" in err and "Traceback" not in err, err
