"""Supervision (issue 14): a scorer that raises on one review, or an LLM task that raises, stops the service
within the drain deadline with one fatal failure (never a hang), commits nothing past the broken review, and a
restart with working parts labels every review. In-process, so the broken part can be injected."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest

from consumer import app
from consumer.config import Settings, load_settings
from consumer.llm.pool import LlmPool
from consumer.records import LlmOutcome, Review, Scored
from consumer.sandbox.reviewgen import generate
from consumer.small.reload import ModelWatcher
from consumer.small.scoring import ScoringStage
from consumer.stream import decoding
from consumer.stream import pipeline as pipeline_module
from tests.support import kafka
from tests.support.service import start_standin

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
MARK = "EXPLODE-ON-THIS-REVIEW"
COUNT, MARKED_AT, DRAIN_S = 120, 60, 3.0


class ExplodingScoring(ScoringStage):
    async def score(self, reviews: Sequence[Review]) -> list[Scored]:
        if any(MARK in review.text for review in reviews):
            raise RuntimeError("scorer bug on a marked review")
        return await super().score(reviews)


class ExplodingPool(LlmPool):
    async def label(self, scored: Scored, prompt: Literal["s4l", "plain"] = "s4l") -> LlmOutcome:
        if MARK in scored.review.text:
            raise RuntimeError("LLM task bug on a marked review")
        return await super().label(scored, prompt)


def exploding_decode(value: bytes | None, *args: Any, **kwargs: Any) -> Review:
    """The fetch loop's own code failing on one message (a bug there, not bad input)."""
    if value is not None and MARK.encode() in value:
        raise RuntimeError("fetch loop bug on a marked review")
    return decoding.decode(value, *args, **kwargs)


class DyingWatcher(ModelWatcher):
    """A part that dies on its own while the service runs (here the model watcher, on its first look)."""

    async def run(self) -> None:
        await asyncio.sleep(0.5)  # a moment into the run, not a synchronisation
        raise RuntimeError("model watcher bug")


@pytest.fixture
def llm(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(tmp_path / "standin.log", "--latency-ms", "1-5")
    yield url
    proc.kill()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("SHUNT_")]:
        monkeypatch.delenv(key)


def settings_for(topics: kafka.Topics, llm_url: str, **service: Any) -> Settings:
    names = {name: topics.make(name) for name in ("in", "out", "dlq", "distill", "metrics")}
    return load_settings(
        None,
        {
            "kafka": {"bootstrap_servers": kafka.bootstrap(), "group_id": kafka.unique("g")},
            "topics": {"input": names["in"], "output": names["out"], "dlq": names["dlq"],
                       "distill": names["distill"], "metrics": names["metrics"]},
            "llm": {"base_url": llm_url, "rpm": 1_000_000, "tpm": 1_000_000_000},
            "router": {"threshold": 1.0},  # every review goes to the LLM
            "admin": {"enabled": False},
            "model": {"batch_size": 8},
            "service": {"drain_timeout_s": DRAIN_S, "log_format": "json"} | service,
        },
    )  # fmt: skip


def with_marked_review(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows[MARKED_AT] = rows[MARKED_AT] | {"text": f"{MARK} {rows[MARKED_AT]['text']}"}
    return rows


@pytest.mark.parametrize("broken", ["scorer", "llm-task", "model-watcher", "fetch-loop"])
async def test_a_part_that_raises_stops_the_service_within_the_deadline_and_loses_nothing(
    report: Callable[[str], None],
    topics: kafka.Topics,
    llm: str,
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    broken: str,
) -> None:
    settings = settings_for(topics, llm)
    rows = with_marked_review([r.as_dict() for r in generate(COUNT, seed=51, prefix="sup")])
    kafka.produce(settings.topics.input, [orjson.dumps(r) for r in rows])
    with monkeypatch.context() as patch:
        patched = {"scorer": ("ScoringStage", ExplodingScoring), "llm-task": ("LlmPool", ExplodingPool),
                   "model-watcher": ("ModelWatcher", DyingWatcher)}  # fmt: skip
        if broken == "fetch-loop":
            patch.setattr(pipeline_module, "decode", exploding_decode)
        else:
            patch.setattr(app, *patched[broken])
        started = time.monotonic()
        pipeline = await asyncio.wait_for(app.run_service(settings, handle_signals=False), DRAIN_S + 60)
        stopped_s = time.monotonic() - started
    assert pipeline.failure is not None and not pipeline.healthy()
    committed = kafka.committed(settings.kafka.group_id, settings.topics.input, 1)[0]
    if broken == "model-watcher":
        assert pipeline.failure.what == "model-watcher" and "model watcher bug" in pipeline.failure.detail
    else:
        assert "marked review" in pipeline.failure.detail
        assert committed <= MARKED_AT, f"committed {committed}, past the review that never finished"
    restart = settings.model_copy(update={"service": settings.service.model_copy(update={"idle_timeout_s": 4.0})})
    again = await asyncio.wait_for(app.run_service(restart, handle_signals=False), 120)
    assert again.failure is None
    labeled = kafka.read_json(settings.topics.output, COUNT)
    assert {r["id"] for r in rows} <= {r["id"] for r in labeled}
    report(
        f"{broken} raising: stopped with '{pipeline.failure.what}' failure in {stopped_s:.1f} s (drain deadline "
        f"{DRAIN_S} s), committed {committed} (marked review at {MARKED_AT}); restart: {COUNT} of {COUNT} labeled"
    )
