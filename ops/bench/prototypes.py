"""Prototypes of hot-path code changes, measured in the real service without editing ``consumer/``.

A throughput variant with ``BENCH_PROTO=name[+name...]`` runs the service with ``PYTHONPATH`` pointing at a
generated ``sitecustomize.py`` that imports this module and applies the named patches before the service
starts. Each patch is the exact change proposed in BENCHMARKS.md, written as a replacement of one
function or method; the lead applies the real diff. For example::

    .venv/bin/python ops/bench/throughput.py --variant pipelined:BENCH_PROTO=pipelined

Patches: ``pipelined`` (the score loop keeps the next batch scoring while it publishes this one),
``workers2`` (two scoring threads; needs ``pipelined`` to matter), ``fasttok`` (``encode_batch_fast``),
``switch1ms`` (GIL switch interval 1 ms),
``glue`` (cheaper per-review hops: arithmetic baseline estimate, no Fraction for free reviews, one
loop wake-up per batch of delivery reports).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson

from consumer.llm import prompting

PROTO_DIR = Path(__file__).resolve().parents[2] / ".bench" / "proto"
ENV = "BENCH_PROTO"


def site_dir() -> Path:
    """A folder with a ``sitecustomize.py`` that applies ``$BENCH_PROTO``; put it on PYTHONPATH."""
    PROTO_DIR.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    (PROTO_DIR / "sitecustomize.py").write_text(
        f"import os, sys\nif os.environ.get({ENV!r}):\n"
        f"    sys.path.insert(0, {str(here)!r})\n"
        f"    import prototypes\n    prototypes.apply(os.environ[{ENV!r}])\n"
    )
    return PROTO_DIR


def env_for(names: str) -> dict[str, str]:
    """The environment that makes a service child apply ``names`` (``a+b``)."""
    return {ENV: names, "PYTHONPATH": str(site_dir())}


# -- the patches -----------------------------------------------------------------------------------------
def pipelined() -> None:
    """consumer/pipeline.py, Pipeline._score_loop: score batch n+1 while batch n is routed and published."""
    from consumer.stream.pipeline import Pipeline

    async def _score_loop(self: Any) -> None:
        ready: asyncio.Queue[asyncio.Future[Any] | None] = asyncio.Queue(2)

        async def feed() -> None:
            while (batch := await self._batches.get()) is not None:
                await ready.put(asyncio.ensure_future(self._scoring.score(batch)))
            await ready.put(None)

        feeder = asyncio.create_task(feed(), name="score-feed")
        while (future := await ready.get()) is not None:
            for scored in await future:
                await self._dispatch(scored)
        await feeder

    Pipeline._score_loop = _score_loop  # type: ignore[method-assign]


def workers2() -> None:
    """consumer/scoring.py, ScoringStage.__init__: two scoring threads (ONNX Runtime and tokenizers are
    thread-safe; batches still come back in order because the pipeline awaits them in order)."""
    from consumer.small.scoring import ScoringStage

    original = ScoringStage.__init__

    def __init__(self: Any, scorer: Any, *, max_pending: int = 2) -> None:
        original(self, scorer, max_pending=max_pending)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shunt-scoring")

    ScoringStage.__init__ = __init__  # type: ignore[method-assign]


def fasttok() -> None:
    """consumer/scoring.py, OnnxScorer.encode: ``encode_batch_fast`` (tokenizers >= 0.20) instead of
    ``encode_batch``: the same ids without computing character offsets, which we never read."""
    from consumer.small.scoring import OnnxScorer

    def encode(self: Any, texts: Any) -> Any:
        cap = self._max_chars
        encodings = self._tokenizer.encode_batch_fast([t if len(t) <= cap else t[:cap] for t in texts])
        return self._feeds([encoding.ids for encoding in encodings])

    OnnxScorer.encode = encode  # type: ignore[method-assign]


def switch1ms() -> None:
    """consumer/app.py, run_service (or __main__): sys.setswitchinterval(0.001)."""
    sys.setswitchinterval(0.001)


def glue() -> None:
    """Three per-review savings on the event-loop thread (see each helper)."""
    _fast_estimate()
    _meter_skip_zero_cost()
    _batched_delivery_reports()


@functools.cache
def _plain_constants(labels: tuple[str, ...]) -> tuple[int, int]:
    """(tokens of everything but the user message, bytes of the user message without the review)."""
    system, user = prompting._messages("", labels, None)
    fixed = prompting.TOKENS_PER_REPLY + 2 * prompting.TOKENS_PER_MESSAGE + prompting.count_tokens(system["content"])
    return fixed, len(user["content"].encode("utf-8")) - len(orjson.dumps(""))


def fast_estimate(text: str, labels: tuple[str, ...] = ("negative", "positive")) -> int:
    """Proposed ``estimate_prompt_tokens``: the plain-v1 prompt is constant text plus the JSON-escaped
    review, so only the review's JSON bytes are counted; exactly equal (glue.py checks every review)."""
    fixed, user_bytes = _plain_constants(labels)
    return fixed + math.ceil((user_bytes + len(orjson.dumps(text))) / prompting.BYTES_PER_TOKEN)


def meter_on_labeled(
    self: Any, source: str, cost_usd: float, answer: Any, est_prompt_tokens: int, latency_ms: float
) -> None:
    """Proposed ``Meter.on_labeled``: the same, but the exact Fraction sum only moves when the review cost
    something (a small-path review is free, and Fraction arithmetic is the costliest line here)."""
    path = "large" if source == "cache" else source
    totals = self.totals
    totals.labeled += 1
    setattr(totals, path, getattr(totals, path) + 1)
    if cost_usd:
        self._cost += Fraction(cost_usd)
        totals.cost_usd = float(self._cost)
    real = answer if answer is not None and not answer.cached else None
    if answer is not None and answer.cached:
        totals.cache_hits += 1
    if real is not None:
        self._answered += 1
        totals.prompt_tokens += real.prompt_tokens
        totals.completion_tokens += real.completion_tokens
    self._add_to_baseline(real, est_prompt_tokens)
    for sample in (self.latency[path], self._window_latency[path], self.histograms[path]):
        sample.add(latency_ms)


def _fast_estimate() -> None:
    """consumer/prompting.py, estimate_prompt_tokens -> fast_estimate (above)."""

    def estimate_prompt_tokens(text: str, labels: Any = ("negative", "positive")) -> int:
        return fast_estimate(text, tuple(labels))

    prompting.estimate_prompt_tokens = estimate_prompt_tokens


def _meter_skip_zero_cost() -> None:
    """consumer/metrics.py, Meter.on_labeled -> meter_on_labeled (above)."""
    from consumer.observe.meter import Meter

    Meter.on_labeled = meter_on_labeled  # type: ignore[method-assign]


def _batched_delivery_reports() -> None:
    """consumer/sink.py, KafkaSink: the report callback appends to a list on the producer thread; after each
    ``poll`` the thread hands the whole list to the loop with one ``call_soon_threadsafe`` (one wake-up and
    one self-pipe write per poll instead of per message)."""
    from consumer.kafka.sink import KafkaSink

    def _serve_reports(self: Any) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
            done = [self._done.popleft() for _ in range(len(self._done))]
            if done and self._loop is not None:
                self._loop.call_soon_threadsafe(_run_all, done)

    async def publish(self: Any, out: Any, on_delivered: Callable[[], None]) -> None:
        def report(err: Any, _msg: Any) -> None:
            if err is None:
                self._done.append(on_delivered)
            else:
                self._loop.call_soon_threadsafe(self._redeliver, out, on_delivered, err)

        while True:
            try:
                self._producer.produce(
                    out.topic, value=out.value, key=out.key, headers=list(out.headers), on_delivery=report
                )
                return
            except BufferError:
                await asyncio.sleep(0.005)

    original_init = KafkaSink.__init__

    def __init__(self: Any, kafka: Any) -> None:
        original_init(self, kafka)
        self._done = deque()  # appended by whichever thread runs poll/flush, drained by the report thread

    KafkaSink.__init__ = __init__  # type: ignore[method-assign]
    KafkaSink._serve_reports = _serve_reports  # type: ignore[method-assign]
    KafkaSink.publish = publish  # type: ignore[method-assign]


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        callback()


PATCHES: dict[str, Callable[[], None]] = {
    "pipelined": pipelined,
    "workers2": workers2,
    "switch1ms": switch1ms,
    "fasttok": fasttok,
    "glue": glue,
}


def apply(names: str, quiet: bool = False) -> None:
    """Apply ``a+b+...`` in order; an unknown name stops the service before it starts."""
    for name in filter(None, names.split("+")):
        if name not in PATCHES:
            raise SystemExit(f"unknown prototype {name!r}; known: {sorted(PATCHES)}")
        PATCHES[name]()
    if not quiet:
        print(f"prototypes applied: {names} (pid {os.getpid()})", file=sys.stderr)
