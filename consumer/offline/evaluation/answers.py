"""The LLM's answers: what is kept of each (tokens, not dollars, so a new price re-prices old runs), the
question key, the replay file (the stand-in's label-file format) and the append-only answer cache."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from consumer.config import PriceConfig
from consumer.llm.prompting import Prompt, count_prompt_tokens, count_tokens, normalise_text, parse_payload
from consumer.offline import datasets
from consumer.offline.evaluation.arithmetic import EvaluationError, Kind
from consumer.offline.labels import LabelBook, LabelFileError


@dataclass(frozen=True, slots=True)
class Record:
    """What is kept of one answer: enough to price it again and to replay it."""

    label: str | None
    prompt_tokens: int
    completion_tokens: int
    prompt_version: str
    model: str
    error: str | None = None

    def cost(self, price: PriceConfig) -> float:
        """USD at ``price`` (tokens are kept, not dollars, so a new price list re-prices old answers)."""
        return (self.prompt_tokens * price.input_per_mtok + self.completion_tokens * price.output_per_mtok) / 1e6


def question_key(prompt: Prompt, model: str) -> str:
    """The cache key of a question: prompt version, normalised text and model, plus what else the prompt
    carries (the offered labels and the S4L hint), so a retrained small model's new hint is asked afresh."""
    payload = parse_payload(prompt.messages)
    hint = [[label, p] for label, p in payload.hint]
    parts = [prompt.version, normalise_text(payload.review), model, list(prompt.allowed_labels), hint]
    return hashlib.sha256(orjson.dumps(parts)).hexdigest()


def estimated_record(prompt: Prompt, label: str | None, model: str, error: str | None = None) -> Record:
    """A record whose tokens are the documented estimate (what the stand-in bills): for replay rows that
    do not say what they cost."""
    completion = count_tokens(orjson.dumps({"label": label}).decode()) if label is not None else 0
    return Record(label, count_prompt_tokens(prompt.messages), completion, prompt.version, model, error)


def replay_row(review_id: str | None, text: str, kind: Kind, record: Record) -> dict[str, Any]:
    """One line of ``answers.jsonl``: the stand-in's label-file shape (``id``, else ``text``; ``label``) with
    the prompt kind and what the answer cost. Text is written only for reviews that have no id."""
    row: dict[str, Any] = {"id": review_id} if review_id is not None else {"text": text}
    row |= {"prompt": kind, "label": record.label, "prompt_version": record.prompt_version, "model": record.model}
    row |= {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens}
    if record.error is not None:
        row["error"] = record.error
    return row


def read_json_lines(path: Path, what: str) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; EvaluationError names the bad line."""
    try:
        yield from datasets.iter_jsonl(path)
    except datasets.DatasetError as exc:
        raise EvaluationError(f"{what}: {exc}") from None


class ReplayBook(LabelBook):
    """Recorded answers (the label book), whose load errors are :class:`EvaluationError`."""

    @classmethod
    def load(cls, path: Path, what: str = "replay file") -> ReplayBook:
        try:
            book = LabelBook.load(path, what)
        except LabelFileError as exc:
            raise EvaluationError(str(exc)) from None
        replay = cls([])
        replay._rows = book._rows
        return replay


def replayed_record(row: Mapping[str, Any], prompt: Prompt, model: str) -> Record:
    """A replay row as a record: its own token counts when it has them, else the estimate for ``prompt``."""
    label, error = row.get("label"), row.get("error")
    estimate = estimated_record(prompt, label, str(row.get("model", model)), None if error is None else str(error))
    tokens = row.get("prompt_tokens"), row.get("completion_tokens")
    if not all(isinstance(t, int) and t >= 0 for t in tokens):
        return estimate
    version = str(row.get("prompt_version", prompt.version))
    return Record(
        label, int(row["prompt_tokens"]), int(row["completion_tokens"]), version, estimate.model, estimate.error
    )


class AnswerCache:
    """Answers of earlier runs, so no question is paid for twice: JSON lines keyed by :func:`question_key`,
    appended (and flushed) as each live answer arrives, so an interrupted run keeps what it paid for.

    No review text is stored, only the key's digest. Failed answers are not stored: a rerun asks again.
    A line that does not parse (a run killed mid-write) is skipped and counted in ``skipped``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.skipped = 0
        self._records: dict[str, Record] = {}
        if path.exists():
            self._read()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("ab")

    def __repr__(self) -> str:
        return f"AnswerCache(path={str(self.path)!r}, answers={len(self._records)})"

    def _read(self) -> None:
        for line in self.path.read_bytes().splitlines():
            try:
                row = orjson.loads(line)
                self._records[row["key"]] = Record(
                    row["label"], row["prompt_tokens"], row["completion_tokens"], row["prompt_version"], row["model"]
                )
            except (orjson.JSONDecodeError, KeyError, TypeError):
                self.skipped += line.strip() != b""

    def get(self, key: str) -> Record | None:
        """The stored answer to this question, or None."""
        return self._records.get(key)

    def add(self, key: str, record: Record) -> None:
        """Store a usable answer (failures are not stored)."""
        if record.label is None or key in self._records:
            return
        self._records[key] = record
        row = {"key": key, **{k: v for k, v in asdict(record).items() if k != "error"}}
        self._handle.write(orjson.dumps(row) + b"\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the file; everything added is already on disk."""
        self._handle.close()
