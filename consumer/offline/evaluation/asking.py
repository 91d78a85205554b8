"""The LLM's answers to every question of a run: from a replay file, or from the cache and then live through
the service's own pool (each unique question asked once, every answer cached as it arrives)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from consumer.config import LlmConfig, Settings
from consumer.offline.evaluation.answers import AnswerCache, Record, ReplayBook, replay_row, replayed_record
from consumer.offline.evaluation.arithmetic import Answer, EvaluationError, Item, Kind
from consumer.offline.evaluation.cases import Ask, Case
from consumer.records import LlmFailure, LlmOutcome

Tick = Callable[[], None]
# (description, total) -> a context whose value advances the bar by one; the command draws it.
ProgressBar = Callable[[str, int], AbstractContextManager[Tick]]


@dataclass(slots=True)
class Gathered:
    """The answer to every ask, by (case index, kind), and how they were obtained."""

    records: dict[tuple[int, Kind], Record] = field(default_factory=dict)
    from_cache: int = 0
    fetched: int = 0
    spent_usd: float = 0.0


def replayed(cases: Sequence[Case], asks: Sequence[Ask], path: Path, llm: LlmConfig) -> Gathered:
    """Every answer from the replay file; EvaluationError when any is missing."""
    book = ReplayBook.load(path)
    gathered, missing = Gathered(), []
    for ask in asks:
        case = cases[ask.case]
        row = book.find(case.review_id, case.scored.review.text, ask.kind)
        if row is None:
            missing.append(f"{ask.kind} answer for {case.scored.review.id}")
            continue
        gathered.records[(ask.case, ask.kind)] = replayed_record(row, ask.prompt, llm.model)
    if missing:
        raise EvaluationError(
            f"replay file {path} lacks {len(missing)} answer(s), e.g. {', '.join(missing[:3])}; "
            "record them with a live run (--llm-url) or widen the replay file"
        )
    return gathered


def gather(
    asks: Sequence[Ask], cases: Sequence[Case], settings: Settings, source: Mapping[str, Path | None], bar: ProgressBar
) -> Gathered:
    """Answers from the cache first, the rest live, each unique question asked once."""
    cache_path = source.get("cache")
    cache = AnswerCache(cache_path) if cache_path is not None else None
    try:
        known, todo = _split_known(asks, cache)
        gathered = Gathered(from_cache=len(known))
        if todo:
            fetched = asyncio.run(_fetch_all(settings.llm, list(todo.values()), cases, known, cache, bar=bar))
            gathered.fetched, gathered.spent_usd = len(todo), fetched
    finally:
        if cache is not None:
            cache.close()
    for ask in asks:
        gathered.records[(ask.case, ask.kind)] = known[ask.key]
    return gathered


def _split_known(asks: Sequence[Ask], cache: AnswerCache | None) -> tuple[dict[str, Record], dict[str, Ask]]:
    """(answers the cache has, by key; one ask per question it does not have, by key)."""
    known: dict[str, Record] = {}
    todo: dict[str, Ask] = {}
    for ask in asks:
        hit = cache.get(ask.key) if cache is not None else None
        if hit is not None:
            known[ask.key] = hit
        else:
            todo.setdefault(ask.key, ask)
    return known, todo


async def _fetch_all(
    llm: LlmConfig, todo: Sequence[Ask], cases: Sequence[Case], known: dict[str, Record], cache: AnswerCache | None,
    *, bar: ProgressBar,
) -> float:  # fmt: skip
    """Ask the LLM every question in ``todo`` through the service's pool; returns what the pool spent."""
    from consumer.llm.pool import LlmPool  # noqa: PLC0415 - aiohttp and the pool load only for a live run

    def done(ask: Ask, outcome: LlmOutcome) -> None:
        known[ask.key] = record = _record(outcome, ask, llm.model)
        if cache is not None:
            cache.add(ask.key, record)  # at once: an interrupted run keeps what it paid for

    # The evaluation asks each question once itself; the pool's in-memory cache would only zero the costs.
    config = llm.model_copy(update={"cache_size": 0})
    with bar("asking the LLM", len(todo)) as advance:
        async with LlmPool(config) as pool:
            pending = iter(todo)

            async def feed() -> None:
                for ask in pending:  # one iterator shared by the feeders: each ask is taken once
                    done(ask, await pool.label(cases[ask.case].scored, prompt=ask.kind))
                    advance()

            async with asyncio.TaskGroup() as group:
                for _ in range(min(len(todo), 2 * config.max_concurrency)):  # keeps every worker busy
                    group.create_task(feed())
            return pool.stats().cost_usd


def _record(outcome: LlmOutcome, ask: Ask, model: str) -> Record:
    if isinstance(outcome, LlmFailure):
        # The pool reports a failure's cost but not its tokens; it stays out of the methods' cost (and is
        # in spent_usd), and the review gets the fallback the service would publish.
        return Record(None, 0, 0, ask.prompt.version, model, outcome.reason)
    return Record(outcome.label, outcome.prompt_tokens, outcome.completion_tokens, outcome.prompt_version, model)


def write_answers(path: Path, cases: Sequence[Case], asks: Sequence[Ask], gathered: Gathered) -> None:
    """Every answer of the run, in the replay format, so ``--replay`` reproduces the run."""
    lines = []
    for ask in asks:
        case = cases[ask.case]
        row = replay_row(case.review_id, case.scored.review.text, ask.kind, gathered.records[(ask.case, ask.kind)])
        lines.append(orjson.dumps(row) + b"\n")
    path.write_bytes(b"".join(lines))


def items_of(cases: Sequence[Case], gathered: Gathered, llm: LlmConfig) -> list[Item]:
    price = llm.price()

    def answer(number: int, kind: Kind) -> Answer | None:
        record = gathered.records.get((number, kind))
        return None if record is None else Answer(record.label, record.cost(price))

    out = []
    for number, case in enumerate(cases):
        plain = answer(number, "plain")
        assert plain is not None  # every review was asked the plain prompt
        prediction = case.scored.prediction
        out.append(Item(case.truth, prediction.label, prediction.confidence, plain, answer(number, "s4l")))
    return out
