"""The small model: a scorer protocol, the ONNX Runtime + ``tokenizers`` implementation, and the async stage.

A model folder follows the HF/optimum export layout (model.onnx, tokenizer.json, config.json with
id2label; optional calibration.json with a temperature), so a user's own exported classifier drops in
(loading and its checks: :mod:`consumer.small.loading`). Inference runs on a few bounded worker threads,
each on its own copy of the model, so the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog
from tokenizers import Tokenizer

from consumer.aio import cancel_and_wait
from consumer.errors import ModelLoadError
from consumer.records import Prediction, Review, Scored
from consumer.small import loading
from consumer.small.calibration import softmax
from consumer.small.loading import FEEDABLE_INPUTS, REQUIRED_FILES, GraphInputs

__all__ = ["CHARS_PER_TOKEN_CAP", "FEEDABLE_INPUTS", "REQUIRED_FILES", "OnnxScorer", "Scorer", "ScoringStage"]

log = structlog.get_logger(__name__)

# Texts are cut at this many characters per allowed token before tokenising. A token covers at least one
# character unless the text is mostly whitespace or characters the normaliser drops, so real text keeps the
# same first max_tokens tokens. The cut keeps a 1 MB review at ~3 ms instead of ~0.5 s of tokenisation.
CHARS_PER_TOKEN_CAP = 32
# A batch is split over the workers only into parts at least this big: below it, a part's fixed cost (the
# hand-off, ONNX Runtime's per-run overhead) outweighs what the second core saves.
MIN_SPLIT = 16


@runtime_checkable
class Scorer(Protocol):
    """Anything that turns texts into calibrated predictions; tests inject their own.

    A scorer may also offer ``replica() -> Scorer`` (an independent copy for another thread); without it
    the stage never calls ``predict`` from two threads at once."""

    version: str
    labels: tuple[str, ...]

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """One prediction per text, in order. Called from one worker thread at a time."""
        ...


@dataclass(frozen=True, slots=True)
class _Source:
    """Where a scorer was loaded from and how, so a replica opens the same graph the same way."""

    folder: Path
    stamp: tuple[int, int]
    intra_op_threads: int
    inter_op_threads: int


class OnnxScorer:
    """A classifier in the HF/optimum ONNX layout, with temperature-scaled softmax."""

    def __init__(
        self,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        labels: tuple[str, ...],
        *,
        version: str,
        temperature: float,
        inputs: GraphInputs,
        max_tokens: int,
        pad_id: int,
        source: _Source | None = None,
    ) -> None:
        self.version = version
        self.labels = labels
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._session = session
        self._tokenizer = tokenizer
        self._tokenizer.enable_truncation(max_tokens)
        self._inputs = inputs
        self._pad_id = pad_id
        self._max_chars = max_tokens * CHARS_PER_TOKEN_CAP
        self._source = source

    @property
    def tokenizer(self) -> Tokenizer:
        """The loaded tokenizer, truncating at ``max_tokens`` (the benchmark times it alone)."""
        return self._tokenizer

    @classmethod
    def load(
        cls, path: Path, *, max_tokens: int = 256, intra_op_threads: int = 0, inter_op_threads: int = 1
    ) -> OnnxScorer:
        """Load and check a model folder; every problem is a :class:`ModelLoadError` naming the folder."""
        path = Path(path)
        loading.check_files(path)
        folder, stamp = path.resolve(), loading.stamp(path)
        config = loading.read_json(path, "config.json")
        labels = loading.read_labels(path, config)
        tokenizer, pad_id = loading.load_tokenizer(path)
        session = loading.open_session(path, intra_op_threads, inter_op_threads)
        scorer = cls(
            session,
            tokenizer,
            labels,
            version=loading.model_version(path, config),
            temperature=loading.read_temperature(path),
            inputs=loading.read_graph_inputs(path, session),
            max_tokens=loading.token_limit(max_tokens, config),
            pad_id=pad_id,
            source=_Source(folder, stamp, intra_op_threads, inter_op_threads),
        )
        scorer._check_output_width(path)
        log.info("scoring.model_loaded", path=str(path), version=scorer.version, labels=list(labels))
        return scorer

    def replica(self) -> OnnxScorer:
        """The same model with its own ONNX session and tokenizer, for another scoring thread.

        This scorer is thread-safe too (ONNX Runtime sessions and tokenizers are); a replica only keeps two
        threads from sharing one session's arena. If the folder's model.onnx changed since the load, this
        scorer itself: a replica must score exactly like it."""
        source = self._source
        if source is None or loading.stamp(source.folder) != source.stamp:
            return self
        session = loading.open_session(source.folder, source.intra_op_threads, source.inter_op_threads)
        return OnnxScorer(
            session,
            Tokenizer.from_str(self._tokenizer.to_str()),
            self.labels,
            version=self.version,
            temperature=self.temperature,
            inputs=self._inputs,
            max_tokens=self.max_tokens,
            pad_id=self._pad_id,
            source=source,
        )

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Tokenise, pad to the longest text of the batch, run the graph, softmax(logits / T)."""
        if not texts:
            return []
        probs = self.probabilities(texts)
        labels, version = self.labels, self.version
        best = probs.argmax(axis=1).tolist()  # the first of equal maxima, as max() would pick
        return [
            Prediction(labels[i], row[i], dict(zip(labels, row, strict=True)), version)
            for row, i in zip(probs.tolist(), best, strict=True)
        ]

    def probabilities(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        """The calibrated probability matrix (texts x labels), for callers that want arrays."""
        logits = self.logits(self.encode(texts))
        return softmax(logits, self.temperature)

    def encode(self, texts: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
        """The graph's feeds for ``texts``: ids padded to the batch's longest, its mask, zero type ids."""
        cap = self._max_chars
        # encode_batch_fast skips the character offsets we never read: the same ids, measured ~35% faster.
        encodings = self._tokenizer.encode_batch_fast([t if len(t) <= cap else t[:cap] for t in texts])
        ids = [encoding.ids for encoding in encodings]
        return self._feeds(ids)

    def logits(self, feeds: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        """Raw graph output for pre-built feeds (the benchmark's ceiling)."""
        out: npt.NDArray[np.float32] = self._session.run([self._inputs.output], feeds)[0]
        return out

    def _feeds(self, ids: list[list[int]]) -> dict[str, npt.NDArray[Any]]:
        # One flat fromiter plus a boolean scatter: measured ~15% faster end to end than letting the
        # tokenizer pad and converting the padded lists (padding in Rust allocates a second copy).
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        width = max(1, int(lengths.max()))  # an all-empty batch still gets one (masked) position
        mask = np.arange(width) < lengths[:, None]
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        input_ids = np.full(mask.shape, self._pad_id, dtype=np.int64)
        input_ids[mask] = flat
        feeds: dict[str, npt.NDArray[Any]] = {}
        for name, dtype in self._inputs.dtypes.items():
            if name == "input_ids":
                feeds[name] = input_ids.astype(dtype, copy=False)
            elif name == "attention_mask":
                feeds[name] = mask.astype(dtype)
            else:
                feeds[name] = np.zeros(mask.shape, dtype=dtype)
        return feeds

    def _check_output_width(self, path: Path) -> None:
        """Run one probe text: a width mismatch or a graph that fails on real input fails the load."""
        try:
            logits = self.logits(self.encode(["probe"]))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"model folder {path}: model.onnx failed on a probe input: {exc}") from None
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise ModelLoadError(
                f"model folder {path}: config.json id2label has {len(self.labels)} labels but the graph's "
                f"'{self._inputs.output}' output has shape {list(logits.shape)} (expected [batch, {len(self.labels)}])"
            )


class ScoringStage:
    """The pipeline's scoring hop: predictions off the event loop on ``workers`` threads, a bounded backlog.

    With more than one worker, each thread scores on its own replica of the model (``scorer.replica()``:
    its own ONNX session and tokenizer) and tokenises on its own thread (``TOKENIZERS_PARALLELISM=false``):
    measured, two single-threaded workers beat one worker whose tokenizer and ONNX Runtime spread one batch
    over both cores (BENCHMARKS.md, P2). Batches come back in the order the caller awaits them."""

    def __init__(self, scorer: Scorer, *, workers: int = 1, max_pending: int | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._scorer = scorer
        self._workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shunt-scoring")
        # The executor's own queue is unbounded; this keeps at most `max_pending` batches queued or running:
        # by default every worker busy and one batch waiting, so no worker idles between batches.
        self._slots = asyncio.Semaphore(max_pending or workers + 1)
        self._own = threading.local()  # per worker thread: (the model it was given, the replica it scores on)
        self._unclaimed: Scorer | None = scorer  # the first thread to score a model uses it as it is
        self._claim = threading.Lock()
        self._serial = threading.Lock()  # for a scorer without replica(): one thread at a time, as promised
        self._closed = False
        self._scoring = 0  # batches being scored now (read and written on the event loop only)
        if workers > 1:
            # Each worker tokenises on its own thread; the rayon pool would split every batch over both
            # cores and make the two workers wait on each other. An explicit setting is respected.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    @property
    def scorer(self) -> Scorer:
        """The model that scores the next batch."""
        return self._scorer

    @property
    def workers(self) -> int:
        """How many batches can be scored at once."""
        return self._workers

    async def score(self, reviews: Sequence[Review]) -> list[Scored]:
        """Score a batch on the worker threads; the whole batch uses one model, even across a swap.

        A batch of at least ``2 * MIN_SPLIT`` reviews is split into contiguous parts, one per worker not already
        scoring another batch, so every worker has work even when the caller awaits one batch at a time (a
        caller that keeps several batches in flight gets one worker per batch, and fewer hand-offs); the parts
        come back in order."""
        if self._closed:
            raise RuntimeError("ScoringStage is closed")
        if not reviews:
            return []
        scorer = self._scorer
        texts = [review.text for review in reviews]
        async with self._slots:
            loop = asyncio.get_running_loop()
            idle = max(1, self._workers - self._scoring)  # a caller with batches in flight gets whole batches
            self._scoring += 1
            try:
                parts = [
                    loop.run_in_executor(self._executor, self._predict, scorer, part) for part in _split(texts, idle)
                ]
                predictions = [p for part in await asyncio.gather(*parts) for p in part]
            finally:
                self._scoring -= 1
        return list(map(Scored, reviews, predictions))

    async def each(
        self,
        batches: asyncio.Queue[list[Review] | None],
        handle: Callable[[list[Scored]], Awaitable[None]],
        ahead: int = 2,
    ) -> None:
        """Score every batch from ``batches`` until a None and ``handle`` each, in order, while up to ``ahead``
        later batches are already scoring: the workers never wait for ``handle`` (routing, publishing)."""
        ready: asyncio.Queue[asyncio.Task[list[Scored]] | None] = asyncio.Queue(ahead)
        feeder = asyncio.create_task(self._feed(batches, ready), name="score-feed")
        try:
            while (scoring := await ready.get()) is not None:
                await handle(await scoring)
        finally:  # an error or a cancel: every task made here is cancelled and awaited
            await cancel_and_wait([feeder])
            left = [ready.get_nowait() for _ in range(ready.qsize())]
            await cancel_and_wait([task for task in left if task is not None])

    async def _feed(
        self, batches: asyncio.Queue[list[Review] | None], ready: asyncio.Queue[asyncio.Task[list[Scored]] | None]
    ) -> None:
        while (batch := await batches.get()) is not None:
            scoring = asyncio.create_task(self.score(batch), name="score-batch")
            try:
                await ready.put(scoring)
            except asyncio.CancelledError:  # cancelled while waiting for room: this task is nobody else's
                await cancel_and_wait([scoring])
                raise
        await ready.put(None)

    def _predict(self, scorer: Scorer, texts: list[str]) -> list[Prediction]:
        """On a worker thread: score on this thread's replica of ``scorer``."""
        if self._workers > 1 and not callable(getattr(scorer, "replica", None)):
            with self._serial:
                return scorer.predict(texts)
        return self._replica(scorer).predict(texts)

    def _replica(self, scorer: Scorer) -> Scorer:
        own: tuple[Scorer, Scorer] | None = getattr(self._own, "pair", None)
        if own is not None and own[0] is scorer:
            return own[1]
        with self._claim:
            first = self._unclaimed is scorer
            if first:
                self._unclaimed = None
        replica = scorer if first else _replicate(scorer)
        self._own.pair = (scorer, replica)
        return replica

    def swap(self, scorer: Scorer) -> Scorer:
        """Serve ``scorer`` from the next batch on and return the old one. Labels must not change:
        the router, prompts and output contract were set up for them."""
        if tuple(scorer.labels) != tuple(self._scorer.labels):
            raise ModelLoadError(
                f"new model {scorer.version} has labels {list(scorer.labels)}; "
                f"the running model has {list(self._scorer.labels)}"
            )
        with self._claim:
            old, self._scorer, self._unclaimed = self._scorer, scorer, scorer
        log.info("scoring.model_swapped", old_version=old.version, new_version=scorer.version)
        return old

    def close(self) -> None:
        """Finish the batches in progress and stop the workers. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)


def _split(texts: list[str], workers: int) -> list[list[str]]:
    """``texts`` in up to ``workers`` contiguous, near-equal parts of at least MIN_SPLIT texts each."""
    parts = min(workers, len(texts) // MIN_SPLIT) or 1
    if parts == 1:
        return [texts]
    size, extra = divmod(len(texts), parts)
    bounds = [0]
    for index in range(parts):
        bounds.append(bounds[-1] + size + (index < extra))
    return [texts[start:end] for start, end in itertools.pairwise(bounds)]


def _replicate(scorer: Scorer) -> Scorer:
    """``scorer.replica()``, or the scorer itself when it has none or making one fails (a replica only saves
    sharing; an OnnxScorer is thread-safe)."""
    make = getattr(scorer, "replica", None)
    if not callable(make):
        return scorer
    try:
        replica: Scorer = make()
    except Exception as exc:  # onnxruntime and tokenizers raise untyped errors; sharing still scores right
        log.warning("scoring.replica_failed", version=scorer.version, reason=str(exc))
        return scorer
    log.info("scoring.replica_ready", version=replica.version, thread=threading.current_thread().name)
    return replica
