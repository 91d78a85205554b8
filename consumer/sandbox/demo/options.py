"""What a demo run was asked for, what it is called (its topics and group), and the service's settings for it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from consumer.config import Settings, load_settings
from consumer.errors import ShuntError
from consumer.sandbox.reviewgen import SyntheticReview, generate
from consumer.small.scoring import REQUIRED_FILES

_SMALL_REVIEWS = 300
_SMALL_RATE = 100.0
_OVERFLOW_HIGH_WATER = 20  # a small online backlog, so the demo's overflow starts within seconds
# Tansu answers a fetch only after about fetch.wait.max.ms, even when records are waiting (measured: with
# librdkafka's 500 ms default a small-path review took ~200 ms end to end; with 50 ms, ~16 ms).
FETCH_WAIT_MS = 50


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
    lane: Literal["online", "batch", "overflow"] = "online"
    batch_turnaround_s: float = 5.0  # the stand-in's Batch API answers this long after a batch is created
    drift: bool = False  # the closed loop: the stream turns hard (mixed, sarcastic) halfway; audits, adaptive tau
    budget_usd_per_hour: float | None = None  # the closed loop: a spend cap that binds (budget.priority spend)

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
    deferred: str

    @classmethod
    def for_run(cls, run_id: str) -> Topics:
        prefix = f"demo-{run_id}."
        names = ("reviews", "reviews.labeled", "reviews.dlq", "shunt.metrics", "reviews.distill", "reviews.deferred")
        return cls(*(prefix + n for n in names))

    def partitions(self, input_partitions: int) -> dict[str, int]:
        many = (self.input, self.output, self.deferred)
        return {name: input_partitions if name in many else 1 for name in asdict(self).values()}


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
        # Tansu: the first group join takes about half of session.timeout.ms; see FETCH_WAIT_MS too.
        kafka["consumer"] = {"session.timeout.ms": 6000, "fetch.wait.max.ms": FETCH_WAIT_MS}
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
            "lane": options.lane,
        },
        "batch": {"max_wait_s": 1.0, "poll_interval_s": 0.5, "max_requests": 1_000},
        "admin": {"port": 0},
        "metrics": {"interval_s": 2.0},
        "service": {
            "drain_timeout_s": options.drain_timeout_s,
            "log_level": options.log_level,
        },
    }
    overrides |= closed_loop_settings(options)
    if options.lane == "overflow":
        overrides["llm"] |= {"queue_high_water": _OVERFLOW_HIGH_WATER, "queue_low_water": _OVERFLOW_HIGH_WATER // 2}
    return load_settings(None, overrides)


def closed_loop_settings(options: DemoOptions) -> dict[str, Any]:
    """``--drift``: audit 10% of the small path, alarm under 90% agreement, let the risk rule move tau.
    ``--budget``: cap the LLM spend; the cap lowers tau (to 0.5 at most) and past that takes the fallback."""
    settings: dict[str, Any] = {}
    if options.drift:
        settings["audit"] = {"rate": 0.1, "window": 30, "min_agreement": 0.9, "seed": options.seed}
        settings["router"] = {"mode": "adaptive", "max_error": 0.05}
    if options.budget_usd_per_hour is not None:
        settings["budget"] = {"usd_per_hour": options.budget_usd_per_hour, "priority": "spend", "min_threshold": 0.5}
    if options.threshold is not None:
        settings["router"] = settings.get("router", {}) | {"threshold": options.threshold}
    return settings


def demo_reviews(options: DemoOptions) -> list[SyntheticReview]:
    """The stream; with ``drift`` its second half is mostly hard reviews (the small model's blind spot)."""
    if not options.drift:
        return list(generate(options.reviews, seed=options.seed, prefix="demo"))
    half = options.reviews // 2
    calm = generate(half, seed=options.seed, prefix="demo")
    return [*calm, *generate(options.reviews - half, seed=options.seed + 1, hard_share=1.0, prefix="drift")]


def check_model(path: Path) -> None:
    """Fail before starting anything when the small model is missing."""
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise DemoError(
            f"the small model is missing ({', '.join(missing)} in {path}); train it with `shunt train` "
            "or point SHUNT_MODEL__PATH at a model folder"
        )
