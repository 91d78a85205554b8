"""The batch stage in-process against the real broker and the stand-in's Batch API over real HTTP: deferred
reviews become batches, labels and distill records, the deferred offsets are committed only after; a stage
stopped mid-batch finds its batch again instead of paying twice; expired and failed items end labeled online
or in their fallback."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jsonschema
import orjson
import pytest

from consumer import contracts
from consumer.aio import wait_until
from consumer.config import Settings
from consumer.errors import TransientLlmError
from consumer.kafka.sink import KafkaSink
from consumer.llm.batch import BatchApi, BatchInfo
from consumer.llm.pool import LlmPool
from consumer.observe.meter import Meter
from consumer.records import Origin, Prediction, Review, Scored
from consumer.sandbox.standin import Faults, StandinConfig, StandinServer
from consumer.stream.deferral import Deferrer
from consumer.stream.deferred import BatchStage
from tests.support import kafka
from tests.support.paths import ROOT

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

DEFERRED_SCHEMA = orjson.loads((ROOT / "schemas" / "deferred.v1.json").read_bytes())


def scored(n: int, text: str | None = None) -> Scored:
    origin = Origin("reviews", 0, n, key=f"k{n}".encode(), headers=(("trace", b"t"),), timestamp_ms=1_700_000_000_000)
    probs = {"negative": 0.45, "positive": 0.55}
    review = Review(f"r{n}", text or f"an unsure review number {n}", origin)
    return Scored(review, Prediction("positive", 0.55, probs, "m1"))


@dataclass
class Lane:
    settings: Settings
    standin: StandinServer
    sink: KafkaSink
    meter: Meter


def make_settings(topics: kafka.Topics, url: str, **batch: Any) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": kafka.bootstrap(), "group_id": kafka.unique("g")},
        topics={
            "deferred": topics.make("deferred", partitions=2), "output": topics.make("out"),
            "dlq": topics.make("dlq"), "distill": topics.make("distill"), "input": "reviews",
        },
        llm={"base_url": url, "lane": "batch", "rpm": 100_000, "tpm": 100_000_000},
        batch={"max_requests": 50, "max_wait_s": 0.5, "poll_interval_s": 0.1} | batch,
        service={"commit_interval_s": 0.1, "drain_timeout_s": 5},
    )  # fmt: skip


@pytest.fixture
async def lane(topics: kafka.Topics) -> AsyncIterator[Callable[..., Awaitable[Lane]]]:
    """Starts a stand-in, a sink and a meter on fresh topics; stops them at the end."""
    made: list[Lane] = []

    async def make(faults: Faults | None = None, **batch: Any) -> Lane:
        standin = StandinServer(StandinConfig(faults=faults or Faults(batch_turnaround_s=0.5)))
        url = await standin.__aenter__()
        settings = make_settings(topics, url, **batch)
        sink = KafkaSink(settings.kafka)
        await sink.start()
        made.append(Lane(settings, standin, sink, Meter(settings.llm.price(), 20)))
        return made[-1]

    yield make
    for one in made:
        await one.sink.close(5)
        await one.standin.__aexit__(None, None, None)


async def defer(lane: Lane, count: int, text: Callable[[int], str | None] = lambda _n: None) -> None:
    deferrer = Deferrer(lane.settings, lane.sink)
    delivered = asyncio.Event()
    left = count

    def one() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            delivered.set()

    for n in range(count):
        await deferrer.defer(scored(n, text(n)), one)
    await asyncio.wait_for(delivered.wait(), 30)


async def run_stage(
    lane: Lane, *, finish: bool = True, stop_when: Callable[[], bool] | None = None, api_type: type[BatchApi] = BatchApi
) -> BatchStage:
    """Run a stage until it has finished everything (or, with ``stop_when``, halt it once that holds)."""
    stop = asyncio.Event()
    async with api_type(lane.settings.llm) as api, LlmPool(lane.settings.llm) as pool:
        stage = BatchStage(lane.settings, lane.sink, lane.meter, api, pool)
        if finish:
            stage.finishing.set()
        task = asyncio.create_task(stage.run(stop))
        if stop_when is not None:
            assert await wait_until(stop_when, 60), "the stop condition never held"
            stop.set()
        await asyncio.wait_for(task, 90)
    await lane.sink.flush(10)
    return stage


def outputs(lane: Lane, count: int) -> list[dict[str, Any]]:
    return kafka.read_json(lane.settings.topics.output, count, 30)


async def test_deferred_reviews_are_labeled_by_batches_and_committed_after(
    lane: Callable[..., Awaitable[Lane]],
) -> None:
    one = await lane()
    await defer(one, 120)
    for record in kafka.read_json(one.settings.topics.deferred, 120):
        jsonschema.validate(record, DEFERRED_SCHEMA)
    stage = await run_stage(one)
    results = outputs(one, 120)
    assert Counter(r["id"] for r in results) == Counter(f"r{n}" for n in range(120))
    for result in results:
        contracts.validate("labeled", result)
    assert {r["lane"] for r in results} == {"batch"} and {r["source"] for r in results} == {"large"}
    stats = one.standin.stats()
    assert stats["batches_created"] == stage.batches_created >= 3  # 50 per batch at most, per partition
    assert stats["batch_requests"] == 120 and stats["batch_duplicates"] == 0
    price = one.settings.llm.price()
    billed = (stats["batch_prompt_tokens"] * price.input_per_mtok + stats["batch_completion_tokens"] *
              price.output_per_mtok) / 1e6 * 0.5  # fmt: skip
    assert sum(r["cost_usd"] for r in results) == pytest.approx(billed, rel=1e-9)
    assert one.meter.lane_costs()["batch"] == pytest.approx(billed, rel=1e-9)
    assert one.meter.totals.baseline_cost_usd == pytest.approx(billed * 2, rel=1e-9)
    distilled = kafka.read_json(one.settings.topics.distill, 120)
    assert {d["id"] for d in distilled} == {f"r{n}" for n in range(120)}
    committed = kafka.committed(stage.group, one.settings.topics.deferred, 2)
    assert sum(committed.values()) == 120


async def test_a_stage_stopped_mid_batch_resumes_it_without_paying_twice(lane: Callable[..., Awaitable[Lane]]) -> None:
    one = await lane(Faults(batch_turnaround_s=3.0), max_requests=1000, max_wait_s=0.3)
    await defer(one, 80)
    first = await run_stage(one, finish=False, stop_when=lambda: one.standin.stats()["batches_created"] >= 2)
    assert first.tracker.in_flight() == 0  # revoked on close: nothing committed past what was published
    created = one.standin.stats()["batches_created"]
    second = await run_stage(one)
    stats = one.standin.stats()
    assert second.batches_created == 0 and second.batches_resumed == created
    assert stats["batches_created"] == created and stats["batch_duplicates"] == 0
    results = outputs(one, 80)
    assert {r["id"] for r in results} == {f"r{n}" for n in range(80)}


@pytest.mark.parametrize("on_failure", ["online", "fallback"])
async def test_expired_and_failed_items_end_labeled_online_or_in_the_fallback(
    lane: Callable[..., Awaitable[Lane]], on_failure: str
) -> None:
    faults = Faults(batch_turnaround_s=0.3, batch_item_failure_rate=0.2, batch_expire_rate=0.2)
    one = await lane(faults, on_item_failure=on_failure)
    await defer(one, 100)
    await run_stage(one)
    stats = one.standin.stats()
    lost = stats["batch_items_failed"] + stats["batch_items_expired"]
    assert lost > 0
    results = outputs(one, 100)
    assert {r["id"] for r in results} == {f"r{n}" for n in range(100)}
    lanes = Counter((r["lane"], r["source"]) for r in results)
    if on_failure == "online":
        assert lanes == {("batch", "large"): 100 - lost, ("online", "large"): lost}
        assert stats["answered"] == lost  # asked again over the chat endpoint
    else:
        assert lanes == {("batch", "large"): 100 - lost, ("batch", "fallback"): lost}
        reasons = Counter(r["fallback_reason"] for r in results if r["source"] == "fallback")
        assert set(reasons) <= {"batch_batch_expired", "batch_http_500"}


async def test_a_failed_batch_goes_online(lane: Callable[..., Awaitable[Lane]]) -> None:
    one = await lane(Faults(batch_turnaround_s=0.2, batch_failure_rate=1.0))
    await defer(one, 30)
    await run_stage(one)
    results = outputs(one, 30)
    assert {r["id"] for r in results} == {f"r{n}" for n in range(30)}
    assert {r["lane"] for r in results} == {"online"}


async def test_identical_reviews_in_a_batch_are_asked_once(lane: Callable[..., Awaitable[Lane]]) -> None:
    one = await lane(max_requests=1000, max_wait_s=1.0)
    await defer(one, 30, lambda n: f"the same text, version {n % 3}")
    await run_stage(one)
    results = outputs(one, 30)
    assert {r["id"] for r in results} == {f"r{n}" for n in range(30)}
    stats = one.standin.stats()
    assert stats["batch_requests"] <= 6  # three texts, on at most two partitions
    paid = [r for r in results if not r["llm"]["cached"]]
    assert len(paid) == stats["batch_requests"] and all(r["cost_usd"] == 0 for r in results if r["llm"]["cached"])
    assert len(kafka.read_json(one.settings.topics.distill, len(paid))) == len(paid)


async def test_a_finishing_stage_with_nothing_new_ends(lane: Callable[..., Awaitable[Lane]]) -> None:
    """Everything on the deferred topic is committed already: a batch stop ends instead of waiting for lag."""
    one = await lane()
    await defer(one, 10)
    await run_stage(one)
    again = await run_stage(one)
    assert again.batches_created == 0 and one.standin.stats()["batches_created"] >= 1


class LosesCreateAnswers(BatchApi):
    """Every batch is created, but the answer to each first create is lost on the way back."""

    lost: ClassVar[int] = 0

    async def create(self, input_file_id: str, metadata: Mapping[str, str]) -> BatchInfo:
        info = await super().create(input_file_id, metadata)
        if metadata["shunt_key"] not in LosesCreateAnswers.seen:
            LosesCreateAnswers.seen.add(metadata["shunt_key"])
            LosesCreateAnswers.lost += 1
            raise TransientLlmError("the connection dropped before the answer came")
        return info

    seen: ClassVar[set[str]] = set()


async def test_a_create_whose_answer_was_lost_is_found_not_made_again(lane: Callable[..., Awaitable[Lane]]) -> None:
    one = await lane()
    await defer(one, 60)
    await run_stage(one, api_type=LosesCreateAnswers)
    stats = one.standin.stats()
    assert LosesCreateAnswers.lost >= 2 and stats["batches_created"] == LosesCreateAnswers.lost
    assert stats["batch_duplicates"] == 0
    assert {r["id"] for r in outputs(one, 60)} == {f"r{n}" for n in range(60)}
