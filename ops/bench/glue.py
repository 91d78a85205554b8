"""Micro-benchmark: the per-review Python work on the event-loop thread, hop by hop, without Kafka.

    .venv/bin/python -m ops.bench.glue [--reviews 20000] [--repeats 5]

Each hop the pipeline runs once per small-path review, timed alone on the same typical reviews
(microseconds per review, median of the repeats): decode + validate, the output dict, orjson, the
baseline token estimate, the meter, the offset tracker, the completion object. Beside the delivery-report
hand-off, the cheaper form proposed in BENCHMARKS.md (one loop wake-up per poll), so its saving is measured,
not guessed. The token-estimate and meter savings were measured with the prototypes module, now removed
(issue 18 merges them into the service).
The sum is the event-loop thread's CPU per review: at N reviews/s it keeps N x sum microseconds of
every second busy, holding the GIL the scorer thread also needs.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import click
import orjson

from consumer import contracts
from consumer.config import PriceConfig
from consumer.llm.prompting import estimate_prompt_tokens
from consumer.observe.meter import Meter
from consumer.records import Origin, Prediction, Review, Scored
from consumer.stream import outputs
from consumer.stream.decoding import decode
from consumer.stream.offsets import OffsetTracker
from consumer.stream.pipeline import _Completion
from ops.bench.data import review_texts, review_value, texts_record
from ops.bench.report import table, write_json

PROBS = {"negative": 0.1, "positive": 0.9}


def _hops(values: list[bytes], scored: list[Scored]) -> dict[str, Callable[[int], object]]:
    origin = Origin("bench", 0, 0, None, (), 1_700_000_000_000)
    messages = [outputs.labeled(s, None, 0.0, "bench") for s in scored]
    price = PriceConfig(input_per_mtok=0.15, output_per_mtok=0.6)
    meter = Meter(price, 20)
    tracker = OffsetTracker()
    tracker.assign([("bench", 0)])
    counter = iter(range(10**12))

    def track(_i: int) -> None:
        offset = next(counter)
        tracker.read(("bench", 0), offset)
        tracker.done(("bench", 0), offset)

    return {
        "decode + validate input": lambda i: decode(values[i], origin, 100_000),
        "build output dict (outputs.labeled)": lambda i: outputs.labeled(scored[i], None, 0.0, "bench"),
        "serialise output (orjson)": lambda i: contracts.dumps(messages[i]),
        "headers tuple": lambda i: (*scored[i].review.origin.headers, ("shunt-source", b"small")),
        "baseline token estimate": lambda i: estimate_prompt_tokens(scored[i].review.text),
        "Meter.on_labeled": lambda i: meter.on_labeled("small", 0.0, None, 150, 12.5),
        "offset tracker read + done": track,
        "_Completion object": lambda i: _Completion(origin, 1, lambda c: None, "small"),
        "Scored wrapper (ScoringStage.score)": lambda i: Scored(scored[i].review, scored[i].prediction),
    }


def handoff(count: int, batch: int, per_message: bool) -> float:
    """CPU microseconds per review (both threads) to hand ``count`` delivery reports from a producer-like
    thread to the event loop, in bursts of ``batch`` (what one ``poll`` delivers): one
    ``call_soon_threadsafe`` per report (today) or one per burst (proposed)."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        seen = 0

        def one() -> None:
            nonlocal seen
            seen += 1
            if seen == count:
                done.set()

        def many(callbacks: list[Callable[[], None]]) -> None:
            for callback in callbacks:
                callback()

        def reports() -> None:
            for _ in range(0, count, batch):
                if per_message:
                    for _ in range(batch):
                        loop.call_soon_threadsafe(one)
                else:
                    loop.call_soon_threadsafe(many, [one] * batch)
                time.sleep(0.0005)  # poll() returns, the thread goes back to librdkafka

        thread = threading.Thread(target=reports)
        thread.start()
        await done.wait()
        thread.join()

    started = time.process_time()
    asyncio.run(run())
    return (time.process_time() - started) / count * 1e6


def time_hops(hops: dict[str, Callable[[int], object]], count: int, repeats: int) -> dict[str, float]:
    """Microseconds per review of each hop, median over ``repeats`` (hops take turns within a repeat)."""
    results: dict[str, list[float]] = {name: [] for name in hops}
    for _ in range(repeats):
        for name, hop in hops.items():
            started = time.perf_counter()
            for i in range(count):
                hop(i)
            results[name].append((time.perf_counter() - started) / count * 1e6)
    return {name: statistics.median(v) for name, v in results.items()}


def inputs(count: int) -> tuple[list[bytes], list[Scored]]:
    texts, _ = review_texts()
    values = [review_value(texts, i, "glue") for i in range(count)]
    scored = []
    for i, value in enumerate(values):
        doc: dict[str, Any] = orjson.loads(value)
        review = Review(doc["id"], doc["text"], Origin("bench", i % 4, i, None, (), 1_700_000_000_000))
        scored.append(Scored(review, Prediction("positive", 0.9, PROBS, "bench")))
    return values, scored


@click.command()
@click.option("--reviews", type=click.IntRange(min=100), default=20_000, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
def main(reviews: int, repeats: int) -> None:
    """Time each per-review hop of the event-loop thread."""
    values, scored = inputs(reviews)
    result = time_hops(_hops(values, scored), reviews, repeats)
    count = reviews - reviews % 64
    for label, per_message in (("(current: per report)", True), ("(proposed: per poll)", False)):
        runs = [handoff(count, 64, per_message) for _ in range(repeats)]
        result[f"delivery report hand-off to the loop {label}"] = statistics.median(runs)
    current = sum(v for k, v in result.items() if "(proposed" not in k)
    proposed = sum(v for k, v in result.items() if "(current" not in k)
    rows = [(name, f"{us:.2f}") for name, us in result.items()]
    rows += [("sum, current code", f"{current:.2f}"), ("sum, with the proposed hops", f"{proposed:.2f}")]
    table(f"event-loop work per small-path review, microseconds (median of {repeats})", ["hop", "us/review"], rows)
    texts, source = review_texts()
    write_json(
        "glue",
        {
            **texts_record(texts, source),
            "us_per_review": result,
            "sum_current_us": current,
            "sum_proposed_us": proposed,
        },
    )


if __name__ == "__main__":
    main()
