"""The service end to end against the real broker and the stand-in LLM over real HTTP (issue 4)."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer import contracts
from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.service import Process, start_service, start_standin

pytestmark = pytest.mark.kafka


def write_labels(path: Path, reviews: list[dict[str, Any]], **extra: Any) -> Path:
    with path.open("wb") as handle:
        for review in reviews:
            handle.write(orjson.dumps({"text": review["text"], "label": review["label"]} | extra) + b"\n")
    return path


@pytest.fixture
def reviews() -> list[dict[str, Any]]:
    return [r.as_dict() for r in generate(400, seed=7, hard_share=0.3)]


@pytest.fixture
def standin(tmp_path: Path, reviews: list[dict[str, Any]]) -> Any:
    labels = write_labels(tmp_path / "labels.jsonl", reviews)
    proc, url = start_standin(
        tmp_path / "standin.log", "--policy", "oracle", "--labels", str(labels), "--accuracy", "0.95",
        "--latency-ms", "5-30", "--rpm", "100000", "--tpm", "100000000",
    )  # fmt: skip
    yield url
    proc.kill()


def run_to_end(proc: Process, timeout_s: float = 120) -> None:
    code = proc.wait(timeout_s)
    assert code == 0, proc.log()[-4000:]


def read_distill(topic: str, answers: int) -> list[dict[str, Any]]:
    """The distill records up to the ``answers``-th that is not an audit's."""
    received = kafka.read_until(topic, lambda ms: sum(b'"audit":true' not in m.value() for m in ms) >= answers, 60)
    return [orjson.loads(m.value()) for m in received]


def test_normal_run_labels_each_review_exactly_once(
    topics: kafka.Topics, tmp_path: Path, reviews: list[dict[str, Any]], standin: str
) -> None:
    source, output = topics.make("in", partitions=3), topics.make("out")
    dlq, distill, metrics = topics.make("dlq"), topics.make("distill"), topics.make("metrics")
    kafka.produce_reviews(source, reviews)
    proc = start_service(
        tmp_path / "service.log", "--max-messages", str(len(reviews)),
        topics__input=source, topics__output=output, topics__dlq=dlq, topics__distill=distill,
        topics__metrics=metrics, kafka__group_id=kafka.unique("g"), router__threshold=0.97, llm__base_url=standin,
    )  # fmt: skip
    run_to_end(proc)
    results = kafka.read_json(output, len(reviews))
    ids = Counter(r["id"] for r in results)
    assert set(ids) == {r["id"] for r in reviews}
    assert max(ids.values()) == 1
    for result in results:
        contracts.validate("labeled", result)
    sources = Counter(r["source"] for r in results)
    assert sources["small"] > 0 and sources["large"] > 0, sources
    truth = {r["id"]: r["label"] for r in reviews}
    accuracy = sum(r["label"] == truth[r["id"]] for r in results) / len(results)
    assert accuracy > 0.85, accuracy
    fresh = [r for r in results if r["source"] == "large" and not r["llm"]["cached"]]
    distilled = read_distill(distill, len(fresh))
    answers = [d for d in distilled if not d.get("audit")]  # audits (shadow requests) are distilled too
    assert {d["id"] for d in answers} == {r["id"] for r in fresh}  # cache hits are not new training labels
    for message in distilled:
        contracts.validate("distill", message)


def test_sigterm_drains_exits_zero_and_loses_nothing(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, reviews: list[dict[str, Any]], standin: str
) -> None:
    source, output, group = topics.make("in", partitions=2), topics.make("out"), kafka.unique("g")
    kafka.produce_reviews(source, reviews)
    settings = {
        "topics__input": source, "topics__output": output, "topics__dlq": topics.make("dlq"),
        "topics__distill": topics.make("distill"), "topics__metrics": topics.make("metrics"),
        "kafka__group_id": group, "router__threshold": 0.99, "llm__base_url": standin, "llm__rpm": 3000,
        "service__drain_timeout_s": 15,
    }  # fmt: skip
    proc = start_service(tmp_path / "first.log", **settings)
    kafka.read_until(output, lambda m: len(m) >= 50, 60)
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = proc.wait(30)
    drain_s = time.monotonic() - sent
    report(f"SIGTERM to exit: {drain_s:.2f} s")
    assert code == 0, proc.log()[-3000:]
    assert drain_s < 15 + 10
    restart = start_service(tmp_path / "second.log", "--idle-timeout", "5", **settings)
    run_to_end(restart)
    results = kafka.read_json(output, len(reviews))
    assert {r["id"] for r in results} == {r["id"] for r in reviews}
    report(f"duplicates after SIGTERM and restart: {len(results) - len(reviews)}")
