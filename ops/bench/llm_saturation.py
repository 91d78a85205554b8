"""Benchmark: drive the LLM pool at saturation against the stand-in; it must use its RPM/TPM budget, never more.

    .venv/bin/python -m ops.bench.llm_saturation [--duration 120] [--rpm 600] [--concurrency 16]

The stand-in runs in-process with limits ten times the client's (so any 429 would be the client's fault)
and 200-800 ms latency. ``--drivers`` callers keep the pool's queue full for ``--duration`` seconds. The
table shows the configured RPM, the achieved RPM after the first minute and over the whole run, the most
requests the stand-in saw in any 60 s window, the tokens it billed per minute against the configured TPM
(``--tpm`` low and ``--repeat-text`` long reviews make TPM the binding limit), and the 429s; the same goes
to .bench/llm_saturation.json.
Review texts come from ../shared/data when it is there (read, never copied), else they are generated.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from consumer import logs
from consumer.aio import cancel_and_wait
from consumer.config import LlmConfig
from consumer.llm.pool import LlmPool
from consumer.llm.ratelimit import DEFAULT_MARGIN_S, WINDOW_S
from consumer.records import Origin, Prediction, Review, Scored
from consumer.sandbox.standin import Faults, StandinConfig, StandinServer, parse_latency
from ops.bench.report import BENCH_DIR, REPO

DATA = REPO.parent / "shared" / "data" / "amazon-reviews-train.jsonl"
PROBS = {"negative": 0.42, "positive": 0.58}


@dataclass(frozen=True)
class Result:
    configured_rpm: int
    configured_tpm: int
    duration_s: float
    requests: int
    answered: int
    achieved_rpm_whole_run: float
    achieved_rpm_after_first_minute: float | None
    ideal_rpm: float
    max_requests_in_any_60s_window: int
    tokens: int
    achieved_tpm_whole_run: float
    achieved_tpm_after_first_minute: float | None
    rate_limited_429s_received: int
    rate_limited_429s_sent_by_standin: int
    early_requests: int
    failures_other_than_shutdown: int
    concurrency: int
    latency_ms: tuple[float, float]


def review_texts(path: Path) -> list[str]:
    if path.exists():
        return [orjson.loads(line)["text"] for line in path.read_bytes().splitlines() if line.strip()]
    return [
        f"Generated review {i}: the kettle {'works' if i % 2 else 'broke'} after {i % 30} days." for i in range(500)
    ]


def reviews(texts: list[str], repeat: int = 1) -> Iterator[Scored]:
    """Unique reviews (nothing is answered twice); ``repeat`` > 1 makes long ones, for a TPM-bound run."""
    for n in itertools.count():
        text = " ".join(texts[(n + i) % len(texts)] for i in range(repeat)) + f" (#{n})"
        yield Scored(Review(f"bench-{n}", text, Origin("bench", 0, n)), Prediction("positive", 0.58, PROBS, "bench"))


async def drive(pool: LlmPool, source: Iterator[Scored], stop: asyncio.Event, failures: list[str]) -> None:
    while not stop.is_set():
        outcome = await pool.label(next(source))
        reason = getattr(outcome, "reason", None)
        if reason is not None and reason != "shutdown":
            failures.append(reason)


async def run(options: dict[str, Any]) -> Result:
    rpm, tpm, duration = options["rpm"], options["tpm"], options["duration"]
    latency = parse_latency(options["latency_ms"])
    faults = Faults(latency_ms=latency, rpm=rpm * 10, tpm=tpm * 10)
    server = StandinServer(StandinConfig(faults=faults, keep_bodies=1))
    failures: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    async with server as url:
        config = LlmConfig(base_url=url, rpm=rpm, tpm=tpm, max_concurrency=options["concurrency"], cache_size=0)
        try:
            async with LlmPool(config, drain_timeout_s=1.0) as pool:
                stop, source = asyncio.Event(), reviews(review_texts(options["data"]), options["repeat_text"])
                tasks += [asyncio.create_task(drive(pool, source, stop, failures)) for _ in range(options["drivers"])]
                at_minute, at_end = await _window(server, duration)
                stop.set()
                received = pool.stats().rate_limited
            await asyncio.gather(*tasks)  # each driver ends by itself once the pool has drained
        finally:
            await cancel_and_wait(tasks)  # after an error or Ctrl-C, none is left running
        seen = server.stats()
    return _result(options, at_minute, at_end, seen, received, failures, latency)


Mark = tuple[float, int, int]  # (monotonic time, requests the stand-in received, tokens it billed)


async def _window(server: StandinServer, duration: float) -> tuple[Mark | None, Mark]:
    """The stand-in's request and token counts after the first minute (when the run is longer) and at the end."""
    start = time.monotonic()
    at_minute = await _requests_at(server, start + 60.0) if duration > 60 else None
    return at_minute, await _requests_at(server, start + duration)


async def _requests_at(server: StandinServer, when: float) -> Mark:
    """Wait until monotonic time ``when``; then (that time, requests received, tokens billed) at the stand-in."""
    await asyncio.sleep(max(0.0, when - time.monotonic()))  # a point in time to read the counters, not a sync
    stats = server.stats()
    return when, int(stats["requests"]), int(stats["prompt_tokens"]) + int(stats["completion_tokens"])


def _result(
    options: dict[str, Any],
    at_minute: Mark | None,
    at_end: Mark,
    seen: dict[str, Any],
    received: int,
    failures: list[str],
    latency: tuple[float, float],
) -> Result:
    duration, rpm = options["duration"], options["rpm"]
    after = after_tpm = None
    if at_minute is not None:
        after = (at_end[1] - at_minute[1]) / (at_end[0] - at_minute[0]) * 60.0
        after_tpm = (at_end[2] - at_minute[2]) / (at_end[0] - at_minute[0]) * 60.0
    return Result(
        configured_rpm=rpm, configured_tpm=options["tpm"], duration_s=duration, requests=at_end[1],
        answered=int(seen["answered"]), achieved_rpm_whole_run=round(at_end[1] / duration * 60.0, 1),
        achieved_rpm_after_first_minute=None if after is None else round(after, 1),
        ideal_rpm=round(rpm * WINDOW_S / (WINDOW_S + DEFAULT_MARGIN_S), 1),
        max_requests_in_any_60s_window=int(seen["max_requests_in_any_60s_window"]),
        tokens=at_end[2], achieved_tpm_whole_run=round(at_end[2] / duration * 60.0, 1),
        achieved_tpm_after_first_minute=None if after_tpm is None else round(after_tpm, 1),
        rate_limited_429s_received=received, rate_limited_429s_sent_by_standin=int(seen["rate_limited_sent"]),
        early_requests=int(seen["early_requests"]), failures_other_than_shutdown=len(failures),
        concurrency=options["concurrency"], latency_ms=latency,
    )  # fmt: skip


def _share(value: float | None, limit: int) -> str:
    return "n/a" if value is None else f"{value:,.0f} ({value / limit:.1%})"


def show(result: Result) -> None:
    table = Table(title="LLM pool at saturation (stand-in, real HTTP)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rpm = result.configured_rpm
    after = result.achieved_rpm_after_first_minute
    rows = [
        ("configured RPM", str(rpm)),
        ("achieved RPM, after the first minute", "n/a" if after is None else f"{after} ({after / rpm:.1%})"),
        (
            "achieved RPM, whole run",
            f"{result.achieved_rpm_whole_run} ({result.achieved_rpm_whole_run / rpm:.1%})",
        ),
        (
            "max requests in any 60 s window (stand-in)",
            f"{result.max_requests_in_any_60s_window} (limit {rpm})",
        ),
        ("configured TPM", f"{result.configured_tpm:,}"),
        ("achieved TPM, after the first minute", _share(result.achieved_tpm_after_first_minute, result.configured_tpm)),
        ("achieved TPM, whole run", _share(result.achieved_tpm_whole_run, result.configured_tpm)),
        ("429s received", str(result.rate_limited_429s_received)),
        ("requests in the run / answered incl. drain", f"{result.requests} / {result.answered}"),
        (
            "duration, latency",
            f"{result.duration_s:g} s, {result.latency_ms[0]:g}-{result.latency_ms[1]:g} ms",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@click.command()
@click.option("--duration", type=click.FloatRange(min=5), default=120.0, show_default=True, help="Seconds.")
@click.option("--rpm", type=click.IntRange(min=1), default=600, show_default=True, help="The client's RPM.")
@click.option("--tpm", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="The client's TPM.")
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--drivers", type=click.IntRange(min=1), default=64, show_default=True, help="Callers keeping it busy.")
@click.option("--latency-ms", default="200-800", show_default=True, help="The stand-in's latency LO-HI.")
@click.option("--data", type=click.Path(path_type=Path), default=DATA, help="JSON lines with review 'text'.")
@click.option("--repeat-text", type=click.IntRange(min=1), default=1, show_default=True,
              help="Join this many reviews into one (long reviews: TPM binds before RPM).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=BENCH_DIR / "llm_saturation.json")
def main(**options: Any) -> None:
    """Drive the LLM pool at saturation and report the rate it achieved."""
    logs.configure("warning", "console")
    result = asyncio.run(run(options))
    show(result)
    out: Path = options["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2) + b"\n")
    click.echo(f"wrote {out}")
    if result.rate_limited_429s_received or result.max_requests_in_any_60s_window > result.configured_rpm:
        raise SystemExit("FAIL: the pool went over its budget")


if __name__ == "__main__":
    main()
