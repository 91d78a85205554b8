"""The scoring stage with several workers: batches score at once, each worker on its own replica of the model,
results in order and equal to one worker's; a scorer without replicas is never called from two threads."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from consumer.config import Settings
from consumer.records import Origin, Prediction, Review
from consumer.small.scoring import MIN_SPLIT, OnnxScorer, ScoringStage, _split
from tests.unit.small.test_scoring import write_toy

TEXTS = ["good great", "bad awful awful", "okay so", "zzz unknown", "", "good bad okay"]


def reviews(texts: Sequence[str], start: int = 0) -> list[Review]:
    return [Review(id=f"r{start + i}", text=t, origin=Origin("reviews", 0, start + i)) for i, t in enumerate(texts)]


class Rendezvous:
    """A scorer whose replicas only answer once ``parties`` predictions run at the same time."""

    def __init__(self, version: str, barrier: threading.Barrier, made: list[Rendezvous]) -> None:
        self.version, self.labels = version, ("negative", "positive")
        self._barrier, self._made = barrier, made
        self.threads: set[int] = set()

    def replica(self) -> Rendezvous:
        twin = Rendezvous(self.version, self._barrier, self._made)
        self._made.append(twin)
        return twin

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        self.threads.add(threading.get_ident())
        self._barrier.wait(10)  # BrokenBarrierError unless another worker is scoring at the same moment
        return [Prediction("positive", 0.9, {"negative": 0.1, "positive": 0.9}, self.version) for _ in texts]


class OneAtATime:
    """A scorer without replica(): records whether the stage's lock was held around every prediction."""

    def __init__(self) -> None:
        self.version, self.labels = "plain", ("negative", "positive")
        self.held: list[bool] = []
        self.lock: threading.Lock | None = None

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        self.held.append(self.lock is not None and self.lock.locked())
        return [Prediction("positive", 0.9, {"negative": 0.1, "positive": 0.9}, self.version) for _ in texts]


async def test_two_workers_score_two_batches_at_once_on_their_own_replicas() -> None:
    made: list[Rendezvous] = []
    first = Rendezvous("a", threading.Barrier(2), made)
    stage = ScoringStage(first, workers=2)
    try:
        one, two = await asyncio.gather(stage.score(reviews(["x"] * 3)), stage.score(reviews(["y"] * 2, 3)))
        assert [s.review.id for s in one + two] == ["r0", "r1", "r2", "r3", "r4"]
        # The first worker scores on the loaded model itself, the other on one replica of it.
        assert len(made) == 1 and len(first.threads) == 1 and len(made[0].threads) == 1
        assert first.threads != made[0].threads
    finally:
        stage.close()


async def test_one_large_batch_is_split_over_the_workers_and_comes_back_in_order() -> None:
    made: list[Rendezvous] = []
    stage = ScoringStage(Rendezvous("a", threading.Barrier(2), made), workers=2)
    try:
        # One batch, awaited alone: it only completes if its two halves are scored at the same time.
        scored = await stage.score(reviews([f"t{i}" for i in range(2 * MIN_SPLIT + 1)]))
    finally:
        stage.close()
    assert [s.review.id for s in scored] == [f"r{i}" for i in range(2 * MIN_SPLIT + 1)]
    assert len(made) == 1


class Gate:
    """Replicable; records each call's size and holds every call until released."""

    def __init__(self, sizes: list[int], release: threading.Event) -> None:
        self.version, self.labels = "g", ("negative", "positive")
        self.sizes, self.release = sizes, release

    def replica(self) -> Gate:
        return Gate(self.sizes, self.release)

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        self.sizes.append(len(texts))
        assert self.release.wait(10), "the test never released the scorer"
        return [Prediction("positive", 0.9, {"negative": 0.1, "positive": 0.9}, self.version) for _ in texts]


async def test_a_batch_sent_while_another_is_scoring_goes_whole_to_one_worker() -> None:
    sizes: list[int] = []
    release = threading.Event()
    stage = ScoringStage(Gate(sizes, release), workers=2)
    try:
        first = asyncio.create_task(stage.score(reviews(["a"] * 40)))
        await asyncio.to_thread(lambda: _until(lambda: len(sizes) == 2))  # both halves of the first are running
        second = asyncio.create_task(stage.score(reviews(["b"] * 40, 40)))
        await asyncio.sleep(0)  # one loop step: the task runs up to run_in_executor (its split is decided)
        release.set()
        done = await first + await second
    finally:
        stage.close()
    assert sorted(sizes[:2]) == [20, 20] and sizes[2:] == [40]
    assert [s.review.id for s in done] == [f"r{i}" for i in range(80)]


def _until(condition: Any) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not met in 10 s"
        threading.Event().wait(0.005)


def test_split_keeps_order_and_never_makes_a_part_below_the_minimum() -> None:
    texts = [str(i) for i in range(100)]
    assert _split(texts, 1) == [texts]
    assert _split(texts[: 2 * MIN_SPLIT - 1], 2) == [texts[: 2 * MIN_SPLIT - 1]]
    for workers in (2, 3, 4):
        parts = _split(texts, workers)
        assert [t for part in parts for t in part] == texts
        assert len(parts) == workers and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert len(_split(texts[:40], 4)) == 40 // MIN_SPLIT


async def test_a_scorer_without_replicas_is_never_called_from_two_threads() -> None:
    scorer = OneAtATime()
    stage = ScoringStage(scorer, workers=2)
    scorer.lock = stage._serial
    try:
        batches = await asyncio.gather(*(stage.score(reviews(["t"] * 2, 2 * i)) for i in range(6)))
        assert [s.review.id for batch in batches for s in batch] == [f"r{i}" for i in range(12)]
        assert scorer.held == [True] * 6
    finally:
        stage.close()


async def test_workers_on_a_real_onnx_model_give_one_workers_results_in_order(tmp_path: Path) -> None:
    scorer = OnnxScorer.load(write_toy(tmp_path / "toy"), intra_op_threads=1)
    expected = scorer.predict(TEXTS)
    stage = ScoringStage(scorer, workers=2)
    try:
        batches = await asyncio.gather(*(stage.score(reviews(TEXTS, len(TEXTS) * i)) for i in range(8)))
    finally:
        stage.close()
    for batch in batches:
        assert [s.prediction for s in batch] == expected
    assert [s.review.id for batch in batches for s in batch] == [f"r{i}" for i in range(8 * len(TEXTS))]


def test_a_replica_has_its_own_session_and_tokenizer_and_scores_the_same(tmp_path: Path) -> None:
    scorer = OnnxScorer.load(write_toy(tmp_path / "toy"), max_tokens=4)
    twin = scorer.replica()
    assert twin is not scorer and twin._session is not scorer._session and twin.tokenizer is not scorer.tokenizer
    assert (twin.version, twin.labels, twin.temperature, twin.max_tokens) == (
        scorer.version,
        scorer.labels,
        scorer.temperature,
        scorer.max_tokens,
    )
    assert twin.predict(TEXTS) == scorer.predict(TEXTS)
    assert twin.encode(["good " * 50])["input_ids"].shape == (1, 4)  # truncation carried over


def test_no_replica_from_a_folder_whose_model_changed_since_the_load(tmp_path: Path) -> None:
    folder = write_toy(tmp_path / "toy")
    scorer = OnnxScorer.load(folder)
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")  # a different graph file than the one loaded
    assert scorer.replica() is scorer


async def test_after_a_swap_every_worker_scores_with_the_new_model(tmp_path: Path) -> None:
    old = OnnxScorer.load(write_toy(tmp_path / "old"), intra_op_threads=1)
    new_folder = write_toy(tmp_path / "new")
    (new_folder / "config.json").write_text(
        '{"id2label": {"0": "sad", "1": "meh", "2": "happy"}, "shunt_version": "v2"}', encoding="utf-8"
    )
    new = OnnxScorer.load(new_folder, intra_op_threads=1)
    stage = ScoringStage(old, workers=2)
    try:
        before = await asyncio.gather(*(stage.score(reviews(TEXTS)) for _ in range(4)))
        stage.swap(new)
        after = await asyncio.gather(*(stage.score(reviews(TEXTS)) for _ in range(4)))
    finally:
        stage.close()
    assert {s.prediction.model_version for batch in before for s in batch} == {old.version}
    assert {s.prediction.model_version for batch in after for s in batch} == {"v2"}


def test_workers_turn_tokenizer_parallelism_off_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "placeholder")  # so the teardown restores the original
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    ScoringStage(OneAtATime(), workers=1).close()
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    ScoringStage(OneAtATime(), workers=2).close()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    ScoringStage(OneAtATime(), workers=2).close()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ScoringStage(OneAtATime(), workers=0)


def test_defaults_are_two_single_threaded_workers() -> None:
    model = Settings().model
    assert (model.workers, model.intra_op_threads) == (2, 1)
