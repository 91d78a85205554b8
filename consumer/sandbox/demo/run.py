"""``shunt demo``: the whole pipeline on one machine, ending in what it cost and what it saved.

It starts an embedded Kafka-protocol broker (unless given a real one), creates topics unique to the run,
starts the stand-in LLM in-process as a noisy oracle, produces a stream of synthetic reviews with known
labels at a given rate, runs the real service on it until every review has its output, reads the outputs back
and scores them against the true labels.

How each number is made (the summary says so too):

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

import asyncio
import contextlib
import gc
import math
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # typed here; confluent_kafka.admin re-exports it untyped

from consumer.config import Settings, load_settings
from consumer.errors import ShuntError
from consumer.llm.prompting import estimate_prompt_tokens
from consumer.observe.meter import Meter, Reservoir, ratio, shunt_rate
from consumer.records import LlmAnswer, Source
from consumer.sandbox.embedded_broker import EmbeddedBroker
from consumer.sandbox.reviewgen import LABELS, SyntheticReview, generate
from consumer.sandbox.standin import Faults, Policy, StandinConfig, StandinServer, make_policy
from consumer.small.scoring import REQUIRED_FILES

log = structlog.get_logger(__name__)

_TICK_S = 0.25  # progress refresh and producer pacing period
_POLL_S = 0.02  # re-checking a condition the broker will soon make true
_WARMUP_TIMEOUT_S = 90.0  # the first review waits for the group to form (about 3 s on Tansu)
_CATCH_UP_TIMEOUT_S = 30.0
_ADMIN_TIMEOUT_S = 30.0
_SMALL_REVIEWS = 300
_SMALL_RATE = 100.0
# Tansu answers a fetch only after about fetch.wait.max.ms, even when records are waiting (measured: with
# librdkafka's 500 ms default a small-path review took ~200 ms end to end; with 50 ms, ~16 ms).
_FETCH_WAIT_MS = 50
_SOURCES: dict[str, Source] = {"small": "small", "large": "large", "fallback": "fallback"}


class DemoError(ShuntError):
    """The demo cannot run (no model, no broker, a topic that cannot be created, a stalled stream)."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``shunt demo`` was asked for. ``rate`` is reviews/second; 0 produces as fast as possible."""

    reviews: int = 2000
    rate: float = 40.0
    threshold: float | None = None
    llm_accuracy: float = 0.96
    llm_hard_accuracy: float = 0.80
    llm_latency_ms: tuple[float, float] = (150.0, 600.0)
    llm_rpm: int = 900
    seed: int = 0
    bootstrap: str | None = None
    partitions: int = 3
    drain_timeout_s: float = 3.0  # a Ctrl-C should end the demo in seconds
    log_level: str = "warning"

    @classmethod
    def small(cls, **given: Any) -> DemoOptions:
        """The CI size: 300 reviews at 100/s unless given otherwise."""
        return cls(**({"reviews": _SMALL_REVIEWS, "rate": _SMALL_RATE} | given))


@dataclass(frozen=True)
class Topics:
    """The run's own topics: the service's default names under a ``demo-<run id>.`` prefix."""

    input: str
    output: str
    dlq: str
    metrics: str
    distill: str

    @classmethod
    def for_run(cls, run_id: str) -> Topics:
        prefix = f"demo-{run_id}."
        return cls(
            *(prefix + n for n in ("reviews", "reviews.labeled", "reviews.dlq", "shunt.metrics", "reviews.distill"))
        )

    def partitions(self, input_partitions: int) -> dict[str, int]:
        many = (self.input, self.output)
        return {name: input_partitions if name in many else 1 for name in asdict(self).values()}


# -- the stream and what is true about it -------------------------------------------------------------
@dataclass(frozen=True)
class Truth:
    """The generated reviews, by id, with what the oracle LLM would answer for each."""

    reviews: tuple[SyntheticReview, ...]
    by_id: Mapping[str, SyntheticReview]
    oracle: Mapping[str, str]


def write_labels(reviews: Sequence[SyntheticReview], path: Path) -> Path:
    """The stand-in's label file: JSON lines ``{"id", "text", "label", "hard"}``."""
    with path.open("wb") as handle:
        for review in reviews:
            row = {"id": review.id, "text": review.text, "label": review.label, "hard": review.hard}
            handle.write(orjson.dumps(row) + b"\n")
    return path


def standin_config(options: DemoOptions, labels: Path) -> StandinConfig:
    faults = Faults(latency_ms=options.llm_latency_ms, rpm=options.llm_rpm)
    return StandinConfig(
        policy="oracle",
        labels=labels,
        accuracy=options.llm_accuracy,
        hard_accuracy=options.llm_hard_accuracy,
        seed=options.seed,
        faults=faults,
    )


def make_truth(reviews: Sequence[SyntheticReview], policy: Policy) -> Truth:
    """Ask the oracle offline, for every review, what it answers when offered every label."""
    oracle = {r.id: policy.answer(r.text, r.id, LABELS) or LABELS[0] for r in reviews}
    return Truth(tuple(reviews), {r.id: r for r in reviews}, oracle)


# -- the tally of what came out -------------------------------------------------------------------------
@dataclass
class Tally:
    """Everything counted from the output, DLQ and metrics topics, as the messages arrive."""

    truth: Truth
    meter: Meter
    produced: int = 0
    labelled: int = 0
    dlq: int = 0
    duplicates: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    correct: Counter[str] = field(default_factory=Counter)
    llm_checked: int = 0
    llm_as_predicted: int = 0
    llm_cached: int = 0
    latency: dict[str, Reservoir] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    model_version: str | None = None
    threshold: float | None = None
    service_totals: dict[str, Any] | None = None

    def on_labeled(self, message: Mapping[str, Any]) -> None:
        """Count one output message; a duplicate (at-least-once) is counted once."""
        review = self.truth.by_id.get(str(message.get("id")))
        source = str(message.get("source"))
        if review is None or source not in _SOURCES or review.id in self.seen:
            self.duplicates += review is not None and review.id in self.seen
            return
        self.seen.add(review.id)
        self.labelled += 1
        self.sources[source] += 1
        self.model_version, self.threshold = message.get("model_version"), message.get("threshold")
        self.correct["small"] += message["small"]["label"] == review.label
        self.correct["shunt"] += message["label"] == review.label
        self.correct["llm"] += self.truth.oracle[review.id] == review.label
        self._meter(message, review, source)
        self._latency(message, source)

    def _meter(self, message: Mapping[str, Any], review: SyntheticReview, source: str) -> None:
        # The same call the pipeline makes, from what the output message carries.
        llm = message.get("llm")
        answer = _answer(llm) if source == "large" and llm else None
        if answer is not None and answer.cached:
            self.llm_cached += 1  # the service's answer cache: an identical review was asked before
        elif answer is not None:
            self.llm_checked += 1
            self.llm_as_predicted += answer.label == self.truth.oracle[review.id]
        estimate = estimate_prompt_tokens(review.text) if source in ("small", "fallback") else 0
        latency = float(message.get("latency_ms") or 0.0)
        self.meter.on_labeled(_SOURCES[source], float(message["cost_usd"]), answer, estimate, latency)

    def _latency(self, message: Mapping[str, Any], source: str) -> None:
        value = message.get("latency_ms")
        if value is None or self.labelled == 1:
            return  # the first review waited for the consumer group to form
        for path in ("all", source):
            self.latency.setdefault(path, Reservoir()).add(float(value))

    def on_dlq(self, message: Mapping[str, Any]) -> None:
        self.dlq += 1

    def on_metrics(self, message: Mapping[str, Any]) -> None:
        if message.get("final"):
            self.service_totals = dict(message.get("totals") or {})


def _answer(llm: Mapping[str, Any]) -> LlmAnswer:
    return LlmAnswer(
        label=str(llm["label"]),
        model=str(llm["model"]),
        prompt_tokens=int(llm["prompt_tokens"]),
        completion_tokens=int(llm["completion_tokens"]),
        cost_usd=float(llm["cost_usd"]),
        latency_ms=float(llm["latency_ms"]),
        prompt_version=str(llm["prompt_version"]),
        cached=bool(llm["cached"]),
        attempts=int(llm["attempts"]),
    )


# -- Kafka: topics, the stream in, the outputs back ---------------------------------------------------
def _admin_call(bootstrap: str, call: Callable[[AdminClient], dict[str, Any]]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "client.id": "shunt-demo-admin"})
    futures = call(admin)  # the client stays referenced until every future has resolved
    for name, future in futures.items():
        try:
            future.result(timeout=_ADMIN_TIMEOUT_S)
        except KafkaException as exc:
            raise DemoError(f"{name}: {exc.args[0]}") from None


def create_topics(bootstrap: str, partitions: Mapping[str, int]) -> None:
    """Create the run's topics (replication: the broker's default)."""
    new = [NewTopic(name, num_partitions=count, replication_factor=-1) for name, count in partitions.items()]
    _admin_call(bootstrap, lambda admin: dict(admin.create_topics(new, operation_timeout=_ADMIN_TIMEOUT_S)))
    log.info("demo_topics_created", topics=sorted(partitions))


def delete_run(bootstrap: str, names: Sequence[str], group: str) -> None:
    """Delete the run's topics and consumer group from a real cluster (the embedded broker forgets them)."""
    _admin_call(bootstrap, lambda admin: dict(admin.delete_topics(list(names), operation_timeout=_ADMIN_TIMEOUT_S)))
    _admin_call(bootstrap, lambda admin: dict(admin.delete_consumer_groups([group], request_timeout=_ADMIN_TIMEOUT_S)))


def _review_value(review: SyntheticReview) -> bytes:
    # No true label in the message: the service must not be able to see it.
    return orjson.dumps({"schema_version": "review.v1", "id": review.id, "text": review.text,
                         "metadata": {"domain": review.domain, "source": "shunt demo"}})  # fmt: skip


class StreamProducer:
    """Produces the reviews to the input topic at a steady rate, from the event loop."""

    def __init__(self, bootstrap: str, topic: str, tally: Tally) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "client.id": "shunt-demo-stream",
                "enable.idempotence": True,
                "linger.ms": 5,
            }
        )
        self._closed = False
        self._topic, self._tally = topic, tally
        self._errors: list[str] = []

    async def send(self, reviews: Sequence[SyntheticReview]) -> None:
        """Hand ``reviews`` to the client and wait until the broker has them all."""
        for review in reviews:
            await self._produce(review)
        await self.flush()

    async def flush(self, timeout_s: float = _ADMIN_TIMEOUT_S) -> None:
        """Wait until the broker has acknowledged everything handed over. Delivery reports are served here,
        on the event loop, so the tally is only ever touched from the loop."""
        deadline = time.monotonic() + timeout_s
        while len(self._producer) > 0 and not self._errors and time.monotonic() < deadline:
            self._producer.poll(0)
            await asyncio.sleep(_POLL_S)  # re-check a condition, with a deadline
        if self._errors or len(self._producer) > 0:
            raise DemoError(f"could not produce the reviews: {self._errors[:1] or 'delivery timed out'}")

    async def _produce(self, review: SyntheticReview) -> None:
        while True:
            try:
                self._producer.produce(self._topic, _review_value(review), review.id, on_delivery=self._delivered)
            except BufferError:  # the client's queue is full: serve delivery reports until there is room
                self._producer.poll(0)
                await asyncio.sleep(_POLL_S)
                continue
            self._producer.poll(0)
            return

    async def close(self) -> None:
        """Drop what an interrupted run left unsent and close the client (before the broker goes)."""
        if not self._closed:
            self._closed = True
            self._producer.purge(blocking=False)
            await asyncio.get_running_loop().run_in_executor(None, self._producer.close)

    def _delivered(self, error: Any, message: Message) -> None:
        if error is not None:
            self._errors.append(str(error))
        else:
            self._tally.produced += 1  # acknowledged by the broker

    async def paced(self, reviews: Sequence[SyntheticReview], rate: float, stop: asyncio.Event) -> None:
        """``rate`` reviews per second (0: as fast as possible) until all are sent or ``stop`` is set."""
        started, sent = time.monotonic(), 0
        while sent < len(reviews) and not stop.is_set():
            due = len(reviews) if rate <= 0 else min(len(reviews), int((time.monotonic() - started) * rate) + 1)
            due = min(due, sent + 1000)  # let the progress view breathe when producing flat out
            for review in reviews[sent:due]:
                await self._produce(review)
            sent = due
            await asyncio.sleep(_TICK_S if rate > 0 else 0)  # pacing the stream, not waiting for anything
        await self.flush()


class OutputReader:
    """Reads the output, DLQ and metrics topics from the start (assigned, no group), into the tally.

    The blocking consumer runs on its own thread; every call to it goes through that one thread."""

    def __init__(self, bootstrap: str, topics: Topics, partitions: Mapping[str, int], tally: Tally) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="demo-reader")
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topics.output}.reader",
                                   "client.id": "shunt-demo-reader", "enable.auto.commit": False,
                                   "fetch.wait.max.ms": _FETCH_WAIT_MS})  # fmt: skip
        self._tps = [
            TopicPartition(t, p) for t in (topics.output, topics.dlq, topics.metrics) for p in range(partitions[t])
        ]
        self._consumer.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in self._tps])
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            topics.output: tally.on_labeled,
            topics.dlq: tally.on_dlq,
            topics.metrics: tally.on_metrics,
        }
        self._targets: dict[tuple[str, int], int] | None = None
        self._reached = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OutputReader:
        self._task = asyncio.create_task(self._follow(), name="demo-reader")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._consumer.close)
        self._executor.shutdown(wait=True)

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            messages, reached = await loop.run_in_executor(self._executor, self._step, self._targets)
            for topic, value in messages:
                self._handle(topic, value)
            if reached:
                self._reached.set()

    def _handle(self, topic: str, value: bytes) -> None:
        try:
            self._handlers[topic](orjson.loads(value))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            # Not a message this demo understands: say so, and keep reading the rest.
            log.warning("demo_unreadable_message", topic=topic, error=repr(exc))

    def _step(self, targets: Mapping[tuple[str, int], int] | None) -> tuple[list[tuple[str, bytes]], bool]:
        messages = [
            (m.topic() or "", m.value() or b"") for m in self._consumer.consume(1000, _TICK_S) if m.error() is None
        ]
        messages = [(topic, value) for topic, value in messages if value]
        if targets is None:
            return messages, False
        positions = {(tp.topic, tp.partition): tp.offset for tp in self._consumer.position(self._tps)}
        return messages, all(high == 0 or positions.get(tp, -1) >= high for tp, high in targets.items())

    def _high_watermarks(self) -> dict[tuple[str, int], int]:
        return {(tp.topic, tp.partition): self._consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in self._tps}

    async def catch_up(self, timeout_s: float = _CATCH_UP_TIMEOUT_S) -> bool:
        """Read everything written so far (to the high watermarks now); False if that takes too long."""
        self._targets = await asyncio.get_running_loop().run_in_executor(self._executor, self._high_watermarks)
        try:
            async with asyncio.timeout(timeout_s):
                await self._reached.wait()
        except TimeoutError:
            return False
        return True


# -- what the user sees ----------------------------------------------------------------------------------
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Money:
    """Spend and the all-LLM baseline: from the service's final metrics message when it covers the same
    reviews (``source="metrics"``), else computed from the outputs with the same meter (``"outputs"``)."""

    spend_usd: float
    baseline_usd: float
    savings_usd: float
    cost_ratio: float | None
    source: str
    outputs_spend_usd: float


def money(tally: Tally) -> Money:
    computed, service = tally.meter.totals, tally.service_totals
    if service is not None and service.get("labeled") == computed.labeled:
        spend, baseline, source = float(service["cost_usd"]), float(service["baseline_cost_usd"]), "metrics"
    else:
        spend, baseline, source = computed.cost_usd, computed.baseline_cost_usd, "outputs"
    return Money(spend, baseline, baseline - spend, ratio(spend, baseline), source, computed.cost_usd)


class View(Protocol):
    """Where the demo reports its progress (the command renders it with rich)."""

    def progress(self, snapshot: Snapshot) -> None: ...


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
    )


# -- the run ---------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """One run's identity and how it ended."""

    options: DemoOptions
    run_id: str
    bootstrap: str
    embedded: bool
    workdir: Path
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False
    complete: bool = False
    broker_alive: Callable[[], bool] = lambda: True

    @property
    def broker(self) -> str:
        return f"embedded Tansu at {self.bootstrap}" if self.embedded else self.bootstrap

    @property
    def group(self) -> str:
        return f"demo-{self.run_id}"

    @property
    def topics(self) -> Topics:
        return Topics.for_run(self.run_id)


def demo_settings(run: RunInfo, llm_url: str) -> Settings:
    """The service's settings for this run: its own group and topics, the stand-in, and a stop at N."""
    options = run.options
    kafka: dict[str, Any] = {"bootstrap_servers": run.bootstrap, "group_id": run.group}
    if run.embedded:
        # Tansu: the first group join takes about half of session.timeout.ms; see _FETCH_WAIT_MS too.
        kafka["consumer"] = {"session.timeout.ms": 6000, "fetch.wait.max.ms": _FETCH_WAIT_MS}
    overrides: dict[str, Any] = {
        "kafka": kafka,
        "topics": asdict(run.topics),
        "llm": {
            "base_url": llm_url,
            "model": "standin",
            "api_key": None,
            "api_key_file": None,
            "rpm": options.llm_rpm,
            "tpm": options.llm_rpm * 1000,
        },
        "admin": {"port": 0},
        "metrics": {"interval_s": 2.0},
        "service": {
            "drain_timeout_s": options.drain_timeout_s,
            "log_level": options.log_level,
        },
    }
    if options.threshold is not None:
        overrides["router"] = {"threshold": options.threshold}
    return load_settings(None, overrides)


def check_model(path: Path) -> None:
    """Fail before starting anything when the small model is missing."""
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise DemoError(
            f"the small model is missing ({', '.join(missing)} in {path}); train it with `shunt train` "
            "or point SHUNT_MODEL__PATH at a model folder"
        )


def run_demo(options: DemoOptions, view: View) -> Summary:
    """Run the whole demo and return its summary. Every process and thread it starts is gone on return,
    also when it is interrupted: a first SIGINT/SIGTERM drains and summarises; a second, outside the
    service's own (bounded) drain, aborts with KeyboardInterrupt."""
    if options.reviews < 2:
        raise DemoError("the demo needs at least 2 reviews")
    check_model(load_settings().model.path)
    run_id = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"shunt-demo-{run_id}-")))
        run = RunInfo(options, run_id, options.bootstrap or "", options.bootstrap is None, workdir)
        if run.embedded:
            # Started here, on the main thread and outside the event loop: the kernel's parent-death signal
            # follows the thread that started it, and the broker outlives the loop's own teardown.
            broker = stack.enter_context(EmbeddedBroker(log_path=workdir / "tansu.log"))
            run.bootstrap, run.broker_alive = broker.bootstrap, broker.running
        try:
            return asyncio.run(Demo(run, view).run())
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None  # a second Ctrl-C: aborted, cleaned up, no summary


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signal_handlers(on_signal: Callable[[signal.Signals], None]) -> Iterator[Callable[[], None]]:
    """Route SIGINT/SIGTERM to ``on_signal``; yields a function that installs the handlers again (the
    service installs its own while it runs and restores the defaults when it returns)."""
    loop = asyncio.get_running_loop()

    def install() -> None:
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)

    install()
    try:
        yield install
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)


class Demo:
    """One run on the event loop: stand-in, topics, reader, producer and the service; see :func:`run_demo`."""

    def __init__(self, run: RunInfo, view: View) -> None:
        self.run_info, self.view = run, view
        self.phase = "starting"
        self.stop = asyncio.Event()
        self._main: asyncio.Task[Any] | None = None
        self._signalled = False
        self.broker_lost = False
        self._reinstall: Callable[[], None] = lambda: None
        self._standin: StandinServer | None = None
        self._tally: Tally | None = None

    async def run(self) -> Summary:
        self._main = asyncio.current_task()
        with _signal_handlers(self._on_signal) as reinstall:
            self._reinstall = reinstall
            async with contextlib.AsyncExitStack() as stack:
                tally, settings = await self._start(stack)
                ticker = asyncio.create_task(self._tick(), name="demo-progress")
                stack.push_async_callback(_cancel, ticker)
                reader = await stack.enter_async_context(self._reader(tally))
                producer = StreamProducer(self.run_info.bootstrap, settings.topics.input, tally)
                stack.push_async_callback(producer.close)
                await self._stream(settings, producer)
                if self.broker_lost:
                    raise DemoError("the embedded broker exited during the demo; nothing more can be read back")
                self.phase = "reading the last outputs"
                self.run_info.complete = await reader.catch_up()
                self.run_info.interrupted = tally.labelled + tally.dlq < self.run_info.options.reviews
                assert self._standin is not None
                summary = summarise(tally, self.run_info, self._standin.stats())
                self.phase = "interrupted" if self.run_info.interrupted else "done"
                self.view.progress(self._snapshot())
        return summary

    async def _start(self, stack: contextlib.AsyncExitStack) -> tuple[Tally, Settings]:
        run = self.run_info
        reviews = list(generate(run.options.reviews, seed=run.options.seed, prefix="demo"))
        config = standin_config(run.options, write_labels(reviews, run.workdir / "labels.jsonl"))
        policy = make_policy(config)
        self.phase = "creating topics"
        partitions = run.topics.partitions(run.options.partitions)
        await asyncio.to_thread(create_topics, run.bootstrap, partitions)
        if not run.embedded:
            stack.push_async_callback(asyncio.to_thread, delete_run, run.bootstrap, list(partitions), run.group)
        self.phase = "starting the stand-in LLM"
        self._standin = StandinServer(config, policy)
        llm_url = await stack.enter_async_context(self._standin)
        settings = demo_settings(run, llm_url)
        meter = Meter(settings.llm.price(), settings.llm.max_completion_tokens)
        self._tally = Tally(make_truth(reviews, policy), meter)
        return self._tally, settings

    def _reader(self, tally: Tally) -> OutputReader:
        run = self.run_info
        return OutputReader(run.bootstrap, run.topics, run.topics.partitions(run.options.partitions), tally)

    async def _stream(self, settings: Settings, producer: StreamProducer) -> None:
        """Feed the stream while the service runs, and stop the service once every review has its output."""
        from consumer.app import run_service  # noqa: PLC0415 - the heavy stages load only when the demo runs

        feeding = asyncio.create_task(self._feed(producer), name="demo-producer")
        feeding.add_done_callback(lambda _: self.stop.set())  # done, or failed: the service must not wait on
        try:
            self.phase = "starting the service"
            await run_service(settings, self.stop)
        finally:
            # The service's Kafka producer is closed only when its pipeline is collected (a reference
            # cycle): collect now, while the broker is still up, so it disconnects cleanly.
            gc.collect()
            self._reinstall()
            await _cancel(feeding)
        if not feeding.cancelled() and (error := feeding.exception()) is not None:
            raise error

    async def _feed(self, producer: StreamProducer) -> None:
        assert self._tally is not None
        tally, reviews = self._tally, self._tally.truth.reviews
        # One review first: the stream starts once the service has joined its group and labels.
        await producer.send(reviews[:1])
        self.phase = "waiting for the service to join its consumer group"
        joined = await _wait_until(lambda: tally.labelled + tally.dlq > 0 or self.stop.is_set(), _WARMUP_TIMEOUT_S)
        if not joined:
            raise DemoError(f"the service labelled nothing within {_WARMUP_TIMEOUT_S:.0f} s")
        self.phase = "streaming reviews"
        await producer.paced(reviews[1:], self.run_info.options.rate, self.stop)
        self.phase = "labelling the last reviews"
        # The demo, not max_messages, ends the service: max_messages starts the drain as soon as the last
        # review is read, and its deadline would cut off an LLM backlog that the rate limit is pacing.
        await _wait_until(lambda: tally.labelled + tally.dlq >= len(reviews) or self.stop.is_set(), math.inf)
        self.phase = "every review labelled: stopping the service"

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._signalled and self._main is not None:
            log.warning("demo_aborted", signal=sig.name)
            self._main.cancel()
            return
        self._signalled = True
        log.info("demo_stopping", signal=sig.name)
        self.phase = "stopping: finishing in-flight reviews (Ctrl-C again to abort)"
        self.stop.set()

    async def _tick(self) -> None:
        while True:
            self.view.progress(self._snapshot())
            if not self.broker_lost and not self.run_info.broker_alive():
                log.error("demo_broker_exited", bootstrap=self.run_info.bootstrap)
                self.broker_lost = True
                self.phase = "the embedded broker has exited: stopping"
                self.stop.set()
            await asyncio.sleep(_TICK_S)  # a refresh period

    def _snapshot(self) -> Snapshot:
        assert self._tally is not None and self._standin is not None
        tally, stats = self._tally, self._standin.app.counters
        return Snapshot(
            phase=self.phase,
            total=self.run_info.options.reviews,
            produced=tally.produced,
            labelled=tally.labelled,
            small=tally.sources["small"],
            llm=tally.sources["large"] + tally.sources["fallback"],
            dlq=tally.dlq,
            spend_usd=tally.meter.totals.cost_usd,
            baseline_usd=tally.meter.totals.baseline_cost_usd,
            llm_requests=stats["requests"],
            llm_429s=stats["rate_limited_sent"],
            elapsed_s=time.monotonic() - self.run_info.started,
        )


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` if it still runs, and wait until it has ended."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_TICK_S)  # re-check a condition, with a deadline
    return True
