"""Shared pieces of the Kafka benchmarks: the broker, topics, review data, the service as a child process.

Every benchmark measures against the real Apache Kafka (``ops/kafka/kafka.sh``) on loopback. Topics get
unique names and are deleted at the end, even on failure. Output topics use ``LogAppendTime``, so an
output message's timestamp is the moment the broker made it visible downstream; input timestamps are
``CreateTime`` (the moment the benchmark's producer called ``produce``). Both clocks are this machine's.
Review texts are read at run time from ../shared/data (never copied), else generated.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import confluent_kafka
import onnxruntime
import orjson
import psutil
import tokenizers
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from rich.console import Console
from rich.table import Table

from consumer.offline.datasets import DatasetError, load_amazon
from consumer.sandbox.reviewgen import generate

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / ".bench"
LOG_DIR = BENCH_DIR / "logs"
KAFKA_SH = REPO / "ops" / "kafka" / "kafka.sh"
PYTHON = sys.executable
LOG_APPEND = {"message.timestamp.type": "LogAppendTime"}
SERVICE_TOPICS = ("output", "dlq", "distill", "metrics")
console = Console(width=150)


# -- the broker ------------------------------------------------------------------------------------------
@dataclass
class Broker:
    """The bootstrap address, and whether this benchmark started the broker (then it stops it)."""

    bootstrap: str
    started_here: bool = False

    def stop(self) -> None:
        if self.started_here:
            subprocess.run(["bash", str(KAFKA_SH), "stop"], check=False, capture_output=True)


def _kafka_sh(*args: str) -> tuple[int, str]:
    done = subprocess.run(["bash", str(KAFKA_SH), *args], capture_output=True, text=True, check=False)
    return done.returncode, done.stdout


def _address(stdout: str) -> str | None:
    match = re.search(r"^KAFKA_BOOTSTRAP=(\S+)$", stdout, re.MULTILINE)
    return match.group(1) if match else None


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[Broker]:
    """``--bootstrap``, else ``KAFKA_BOOTSTRAP``, else the running project broker, else start one (and stop it)."""
    given = bootstrap or os.environ.get("KAFKA_BOOTSTRAP")
    handle: Broker | None = Broker(given) if given else None
    if handle is None:
        code, out = _kafka_sh("status")
        running = _address(out) if code == 0 else None
        handle = Broker(running) if running else None
    if handle is None:
        code, out = _kafka_sh("start", "--port", "auto")
        started = _address(out)
        if code != 0 or started is None:
            raise SystemExit("could not start Kafka with ops/kafka/kafka.sh start --port auto")
        handle = Broker(started, started_here=True)
    try:
        yield handle
    finally:
        handle.stop()


class Topics:
    """Creates uniquely named topics and deletes every one of them at the end (a 1M backlog is ~0.5 GB)."""

    def __init__(self, bootstrap: str, run_id: str) -> None:
        self.bootstrap = bootstrap
        self.run_id = run_id
        self._admin = AdminClient({"bootstrap.servers": bootstrap})
        self.created: list[str] = []

    def __enter__(self) -> Topics:
        return self

    def __exit__(self, *_: object) -> None:
        self.delete(self.created)

    def make(self, prefix: str, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", prefix)  # Kafka allows only these in topic names
        name = f"bench-{self.run_id}-{safe}-{uuid.uuid4().hex[:6]}"
        spec = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
        self._admin.create_topics([spec])[name].result(timeout=30)
        self.created.append(name)
        wait_for(lambda: self._has_leaders(name, partitions), 30)
        return name

    def for_service(self, label: str) -> dict[str, str]:
        """A fresh output, DLQ, distill and metrics topic, as ``topics__*`` service settings."""
        return {f"topics__{kind}": self.make(f"{label}-{kind}", 1, LOG_APPEND) for kind in SERVICE_TOPICS}

    def delete(self, names: Sequence[str]) -> None:
        if not names:
            return
        futures = self._admin.delete_topics(list(names), operation_timeout=30)
        for name, future in futures.items():
            with contextlib.suppress(KafkaException):
                future.result(timeout=60)
            if name in self.created:
                self.created.remove(name)

    def _has_leaders(self, topic: str, partitions: int) -> bool:
        metadata = self._admin.list_topics(topic, timeout=5).topics.get(topic)
        if metadata is None or metadata.error is not None or len(metadata.partitions) != partitions:
            return False
        return all(p.leader >= 0 for p in metadata.partitions.values())


def wait_for(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


def run_id() -> str:
    return uuid.uuid4().hex[:6]


# -- review data -----------------------------------------------------------------------------------------
def review_texts() -> tuple[list[str], str]:
    """The shared Amazon review texts (median ~490 chars), else generated texts of ~500 chars median."""
    try:
        texts = [str(row["text"]) for row in load_amazon()]
        return texts, "amazon-reviews-train.jsonl (shared data, read at run time)"
    except DatasetError:
        return _generated(5_000), "generated (reviewgen sentences, ~500 chars median)"


def _generated(count: int) -> list[str]:
    rng = random.Random(7)
    pieces = [review.text for review in generate(count * 3, seed=7)]
    texts = []
    for _ in range(count):
        target = rng.lognormvariate(6.2, 0.5)  # e^6.2 ~ 490 characters
        parts: list[str] = []
        while sum(map(len, parts)) < target:
            parts.append(rng.choice(pieces))
        texts.append(" ".join(parts))
    return texts


def review_value(texts: Sequence[str], index: int, prefix: str) -> bytes:
    """One input message: the texts cycled, each with a unique id."""
    return orjson.dumps({"id": f"{prefix}-{index}", "text": texts[index % len(texts)]})


def median_chars(texts: Sequence[str]) -> int:
    return int(statistics.median(len(t) for t in texts))


def produce_backlog(bootstrap: str, topic: str, texts: Sequence[str], count: int, partitions: int) -> float:
    """Produce ``count`` reviews round-robin over the partitions as fast as possible; returns the seconds."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.kbytes": 262_144,
        }
    )
    started = time.monotonic()
    for index in range(count):
        value = review_value(texts, index, topic)
        while True:
            try:
                producer.produce(topic, value, partition=index % partitions)
                break
            except BufferError:
                producer.poll(0.05)
        if index % 20_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} reviews were not delivered to {topic}")
    return time.monotonic() - started


# -- reading outputs -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One output message: when the broker appended it, its id and path, when the service built it (the
    ``processed_at_ms`` field) and its input's CreateTime (``processed_at_ms - latency_ms``)."""

    append_ms: int
    review_id: str
    source: str
    processed_ms: int | None
    input_ms: int | None


def high_watermarks(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-hw-{uuid.uuid4().hex[:6]}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    finally:
        consumer.close()


def read_outputs(bootstrap: str, topic: str, timeout_s: float = 120) -> list[OutputRecord]:
    """Every message now in ``topic`` (read from the start up to the high watermarks), parsed."""
    ends = high_watermarks(bootstrap, topic)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-reader-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "fetch.max.bytes": 52_428_800,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end > 0])
    records: list[OutputRecord] = []
    left = {p: end for p, end in ends.items() if end > 0}
    deadline = time.monotonic() + timeout_s
    try:
        while left and time.monotonic() < deadline:
            for message in consumer.consume(10_000, 0.5):
                if message.error() is None:
                    records.append(_record(message))
                    partition, offset = message.partition() or 0, message.offset() or 0
                    if offset + 1 >= left.get(partition, 0):
                        left.pop(partition, None)
    finally:
        consumer.close()
    return records


def _record(message: Any) -> OutputRecord:
    _kind, stamp = message.timestamp()
    data = orjson.loads(message.value())
    latency, processed = data.get("latency_ms"), data.get("processed_at_ms")
    if not isinstance(processed, int):
        processed = None
    input_ms = processed - latency if isinstance(latency, int) and processed is not None else None
    return OutputRecord(stamp, str(data.get("id", "")), str(data.get("source", "")), processed, input_ms)


@dataclass(frozen=True)
class Throughput:
    """Rates computed from the broker's append times of the outputs."""

    outputs: int
    unique: int
    first_ms: int
    last_ms: int
    steady_per_s: float  # first output to last output
    wall_per_s: float | None  # start of the process (or client) to last output

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def throughput(records: Sequence[OutputRecord], started_ms: int | None) -> Throughput:
    stamps = sorted(r.append_ms for r in records)
    if len(stamps) < 2:
        raise RuntimeError(f"only {len(stamps)} outputs; nothing to time")
    first, last = stamps[0], stamps[-1]
    steady = (len(stamps) - 1) / max(last - first, 1) * 1000
    wall = len(stamps) / max(last - started_ms, 1) * 1000 if started_ms is not None else None
    unique = len({r.review_id for r in records})
    return Throughput(len(stamps), unique, first, last, steady, wall)


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles, ``{"p50": ..., ...}``; None when there are no values."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for point in points:
        key = f"p{point:g}"
        out[key] = ordered[min(len(ordered) - 1, int(point / 100 * len(ordered)))] if ordered else None
    return out


# -- child processes -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sample:
    """One reading: wall and monotonic time, RSS (children included), cumulative CPU seconds, machine CPU."""

    wall: float
    mono: float
    rss: int
    cpu_s: float
    broker_cpu_s: float
    machine_busy_cores: float


@dataclass
class Sampler:
    """Samples a process's RSS and CPU, the broker's CPU and the whole machine's CPU, in a thread."""

    pid: int
    broker_pid: int | None = None
    interval_s: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(self.pid)
            broker = _process(self.broker_pid)
            psutil.cpu_percent(None)
            cores = os.cpu_count() or 1
            while not self._stop.wait(self.interval_s):
                rss = proc.memory_info().rss + sum(_rss(child) for child in proc.children(recursive=True))
                busy = psutil.cpu_percent(None) * cores / 100
                sample = Sample(time.time(), time.monotonic(), rss, _cpu_s(proc), _cpu_s(broker), busy)
                self.samples.append(sample)

    def peak_rss(self) -> int:
        return max((s.rss for s in self.samples), default=0)

    def _cores(self, attr: str) -> float:
        if len(self.samples) < 2:
            return 0.0
        first, last = self.samples[0], self.samples[-1]
        spent: float = getattr(last, attr) - getattr(first, attr)
        return spent / max(last.mono - first.mono, 1e-9)

    def mean_cpu(self) -> float:
        """The process's mean CPU over the sampling, in percent of one core."""
        return self._cores("cpu_s") * 100

    def broker_cores(self) -> float:
        """Mean cores the Kafka broker used meanwhile (on this same machine)."""
        return self._cores("broker_cpu_s")

    def machine_cores(self) -> float:
        """Mean cores busy on the whole machine while sampling."""
        return statistics.fmean(s.machine_busy_cores for s in self.samples[1:] or self.samples) if self.samples else 0.0

    def others_cores(self) -> float:
        """Mean cores busy outside this process and the broker (other people's work): the noise to report."""
        if not self.samples:
            return 0.0
        busy = statistics.fmean(s.machine_busy_cores for s in self.samples[1:] or self.samples)
        return max(0.0, busy - self._cores("cpu_s") - self._cores("broker_cpu_s"))

    def cpu_between(self, start_s: float, end_s: float) -> tuple[float, float, float, tuple[float, float]] | None:
        """(service CPU s, broker CPU s, wall s, (from, to)) between the first sample at or after ``start_s``
        (wall clock) and the last at or before ``end_s``; None when the window holds fewer than two samples."""
        inside = [s for s in self.samples if start_s <= s.wall <= end_s]
        if len(inside) < 2:
            return None
        first, last = inside[0], inside[-1]
        cpu, broker = last.cpu_s - first.cpu_s, last.broker_cpu_s - first.broker_cpu_s
        return cpu, broker, last.wall - first.wall, (first.wall, last.wall)


def cpu_per_review(sampler: Sampler, stamps_ms: Sequence[int]) -> dict[str, float] | None:
    """Service and broker CPU microseconds per review in the steady window (first to last output)."""
    window = sampler.cpu_between(stamps_ms[0] / 1000, stamps_ms[-1] / 1000)
    if window is None:
        return None
    cpu_s, broker_s, wall_s, (start, end) = window
    reviews = max(1, sum(1 for t in stamps_ms if start * 1000 <= t <= end * 1000))
    return {
        "service_us_per_review": cpu_s / reviews * 1e6,
        "broker_us_per_review": broker_s / reviews * 1e6,
        "service_cores": cpu_s / wall_s,
        "broker_cores": broker_s / wall_s,
    }


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle or waiting for I/O) since boot."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def _cpu_s(proc: psutil.Process | None) -> float:
    """Cumulative user + system CPU seconds of a process and its children."""
    if proc is None:
        return 0.0
    try:
        times = proc.cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)
    except psutil.Error:
        return 0.0


def _process(pid: int | None) -> psutil.Process | None:
    try:
        return psutil.Process(pid) if pid else None
    except psutil.Error:
        return None


def broker_pid(bootstrap: str) -> int | None:
    """The process listening on the bootstrap port on this machine, if any (to sample its CPU)."""
    port = int(bootstrap.split(",", maxsplit=1)[0].rsplit(":", 1)[1])
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    return None


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far per OS thread id of ``pid``."""
    out: dict[int, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


class Child:
    """A child process with its output in a log file; killed (with its children) when the block ends."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.started_ms = time.time_ns() // 1_000_000
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{self.log_path.stem} did not finish within {timeout_s}s") from None

    def terminate(self, timeout_s: float = 30) -> int | None:
        """SIGTERM (the service drains and commits), then SIGKILL after ``timeout_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout_s)
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def service_env(bootstrap: str, settings: dict[str, Any], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of ``shunt run``: SHUNT_<SECTION>__<KEY> from ``section__key`` settings, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHUNT_")}
    env |= {
        "SHUNT_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SHUNT_SERVICE__LOG_FORMAT": "json",
        "SHUNT_ADMIN__PORT": "0",
    }
    env |= {"SHUNT_" + key.upper(): str(value) for key, value in settings.items()}
    env |= extra or {}
    return env


def start_service(name: str, bootstrap: str, settings: dict[str, Any], extra: dict[str, str] | None = None) -> Child:
    return Child(name, [PYTHON, "-m", "consumer", "run"], service_env(bootstrap, settings, extra))


@contextlib.contextmanager
def standin(name: str, latency_ms: str) -> Iterator[str]:
    """The stand-in LLM on a free port (no limits of its own); yields its base URL."""
    port = _free_port()
    args = [PYTHON, "-m", "consumer", "llm-standin", "--port", str(port), "--latency-ms", latency_ms]
    args += ["--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHUNT_")}
    with Child(name, args, env) as child:
        wait_for(lambda: _answers(port) or child.proc.poll() is not None, 30)
        if child.proc.poll() is not None:
            raise RuntimeError(f"the stand-in LLM exited:\n{child.log_tail()}")
        yield f"http://127.0.0.1:{port}/v1"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# -- the machine and the results -------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average matters on a shared 2-core box."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "confluent_kafka": _version(confluent_kafka.version()),
        "librdkafka": confluent_kafka.libversion()[0],
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": tokenizers.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _version(value: Any) -> str:
    """confluent-kafka's ``version()`` is a string in some releases and (string, int) in others."""
    return str(value[0] if isinstance(value, tuple) else value)


def write_json(name: str, data: dict[str, Any]) -> Path:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}.json"
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
    console.print(f"wrote {path.relative_to(REPO)}")
    return path


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    out = Table(title=title)
    for index, column in enumerate(columns):
        out.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        out.add_row(*row)
    console.print(out)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (environment variables: SHUNT_<SECTION>__<KEY>, TOKENIZERS_PARALLELISM, ...)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise SystemExit(f"expected an environment variable KEY=VALUE, got {pair!r}")
        out[key] = value
    return out
