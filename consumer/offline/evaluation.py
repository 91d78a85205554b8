"""Offline evaluation of the Data Shunt: on labelled reviews, what each threshold gains and costs.

Four methods are compared on the same reviews (see docs/evaluation.md):

* ``small``: the small model alone (costs nothing);
* ``llm``: the LLM alone, plain prompt, every review (the cost baseline);
* ``ds``: Data Shunt: confidence >= threshold keeps the small label, the rest get the plain prompt;
* ``ds_plus``: Data Shunt+: the same routing, the rest get the S4L prompt (hint + pruned labels).

The LLM is asked once per review and prompt kind; every threshold is then computed from those answers by
the pure functions at the top of this module. Below them: the answer files (a replay file in the format of
the stand-in's label files, and an append-only cache keyed by the question) and the JSON report.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from consumer.config import PriceConfig
from consumer.errors import ShuntError
from consumer.llm.prompting import Prompt, count_prompt_tokens, count_tokens, normalise_text, parse_payload
from consumer.offline import datasets
from consumer.offline.labels import LabelBook, LabelFileError
from consumer.small.calibration import Bin, expected_calibration_error

Kind = Literal["plain", "s4l"]
Method = Literal["ds", "ds_plus"]
KIND_OF: dict[Method, Kind] = {"ds": "plain", "ds_plus": "s4l"}
METHOD_NAMES = {"small": "small alone", "llm": "LLM alone", "ds": "DS", "ds_plus": "DS+"}
# 0 (nothing to the LLM) and 1 (everything to it) bracket a grid that is finest where calibrated
# confidences crowd, just below 1.
DEFAULT_THRESHOLDS = (
    0.0, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9,
    0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0,
)  # fmt: skip
REPORT_VERSION = 1


class EvaluationError(ShuntError):
    """The evaluation cannot run as asked; the message says what is missing or malformed."""


# --- the arithmetic --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """The LLM's answer to one question. ``label`` None: the pool gave up (tokens it was billed still count)."""

    label: str | None
    cost_usd: float


@dataclass(frozen=True, slots=True)
class Item:
    """One labelled review as the arithmetic sees it: the truth, the small model's view and the LLM's answers.

    ``s4l`` may be None for a review whose confidence is at or above every threshold swept (never needed)."""

    truth: str
    small: str
    confidence: float
    plain: Answer
    s4l: Answer | None = None


@dataclass(frozen=True, slots=True)
class Point:
    """One method at one threshold (None for the two methods that have none)."""

    method: str
    threshold: float | None
    accuracy: float
    macro_f1: float
    llm_share: float
    cost_usd: float
    cost_ratio: float


def macro_f1(truth: Sequence[str], predicted: Sequence[str | None], labels: Iterable[str]) -> float:
    """Unweighted mean of per-label F1 over the labels that occur in the truth or the predictions.

    A None prediction (no answer) is a miss for the true label and a false alarm for no label."""
    scores = []
    for label in labels:
        tp = sum(1 for t, p in zip(truth, predicted, strict=True) if t == label and p == label)
        fp = sum(1 for t, p in zip(truth, predicted, strict=True) if t != label and p == label)
        fn = sum(1 for t, p in zip(truth, predicted, strict=True) if t == label and p != label)
        if tp + fp + fn > 0:  # a label nobody used or predicted says nothing
            scores.append(2 * tp / (2 * tp + fp + fn))
    return math.fsum(scores) / len(scores) if scores else 0.0


def accuracy(truth: Sequence[str], predicted: Sequence[str | None]) -> float:
    """Share of exact matches; 0 for no reviews."""
    if not truth:
        return 0.0
    return sum(1 for t, p in zip(truth, predicted, strict=True) if t == p) / len(truth)


def ratio(part: float, whole: float) -> float:
    """``part / whole``, 0 when the whole is 0 (nothing was spent, so nothing was saved either)."""
    return part / whole if whole > 0 else 0.0


def answer_for(item: Item, kind: Kind) -> Answer:
    """The item's answer to the ``kind`` prompt; EvaluationError when it was never asked."""
    answer = item.plain if kind == "plain" else item.s4l
    if answer is None:
        raise EvaluationError(f"no {kind} answer for a review below the threshold (confidence {item.confidence})")
    return answer


def shunt(item: Item, threshold: float, kind: Kind) -> tuple[str, float, bool]:
    """(final label, cost, sent to the LLM) for one review under Data Shunt with ``threshold``.

    When the LLM gave up, the small label stands, as the service's default fallback publishes it."""
    if item.confidence >= threshold:
        return item.small, 0.0, False
    answer = answer_for(item, kind)
    return (answer.label if answer.label is not None else item.small), answer.cost_usd, True


def labels_of(items: Sequence[Item]) -> list[str]:
    """Every label the truth or the small model uses, sorted: the label set macro-F1 averages over."""
    return sorted({item.truth for item in items} | {item.small for item in items})


def baseline_cost(items: Sequence[Item]) -> float:
    """What the LLM alone costs: the plain prompt for every review."""
    return math.fsum(item.plain.cost_usd for item in items)


def small_alone(items: Sequence[Item]) -> Point:
    """The small model's label for every review; nothing sent, nothing paid."""
    truth, predicted = [i.truth for i in items], [i.small for i in items]
    return Point("small", None, accuracy(truth, predicted), macro_f1(truth, predicted, labels_of(items)), 0, 0, 0)


def llm_alone(items: Sequence[Item]) -> Point:
    """The plain prompt's answer for every review; a review the LLM gave up on counts as wrong."""
    truth, predicted = [i.truth for i in items], [i.plain.label for i in items]
    cost = baseline_cost(items)
    share = 1.0 if items else 0.0
    f1 = macro_f1(truth, predicted, labels_of(items))
    return Point("llm", None, accuracy(truth, predicted), f1, share, cost, 1.0 if cost > 0 else 0.0)


def shunt_point(items: Sequence[Item], threshold: float, method: Method, baseline_usd: float) -> Point:
    """DS or DS+ at one threshold: accuracy, macro-F1, share sent, cost and cost ratio vs ``baseline_usd``."""
    decided = [shunt(item, threshold, KIND_OF[method]) for item in items]
    truth, predicted = [i.truth for i in items], [label for label, _, _ in decided]
    cost = math.fsum(c for _, c, _ in decided)
    share = ratio(sum(1 for _, _, sent in decided if sent), len(items))
    f1 = macro_f1(truth, predicted, labels_of(items))
    return Point(method, threshold, accuracy(truth, predicted), f1, share, cost, ratio(cost, baseline_usd))


def sweep(items: Sequence[Item], thresholds: Sequence[float]) -> dict[Method, list[Point]]:
    """DS and DS+ at every threshold, in the order given."""
    baseline = baseline_cost(items)
    return {method: [shunt_point(items, t, method, baseline) for t in thresholds] for method in ("ds", "ds_plus")}


# --- choosing a threshold -----------------------------------------------------------------------------------


def best_accuracy(points: Sequence[Point]) -> Point | None:
    """The most accurate point; ties go to the cheaper, then to the lower threshold."""
    return min(points, key=lambda p: (-p.accuracy, p.cost_ratio, p.threshold or 0.0), default=None)


def cheapest_reaching(points: Sequence[Point], target: float) -> Point | None:
    """The cheapest point at least as accurate as ``target``; ties go to the more accurate; None if none is."""
    good = [p for p in points if p.accuracy >= target]
    return min(good, key=lambda p: (p.cost_ratio, -p.accuracy, p.threshold or 0.0), default=None)


def best_under_cap(points: Sequence[Point], cap: float) -> Point | None:
    """The most accurate point whose cost ratio is at most ``cap``; None if every point costs more."""
    return best_accuracy([p for p in points if p.cost_ratio <= cap])


@dataclass(frozen=True, slots=True)
class Choice:
    """A threshold chosen for a goal, with the config that sets it. ``point`` None: no threshold meets it."""

    goal: str
    method: str
    point: Point | None
    toml: str | None
    env: str | None


GOALS = {
    "best_accuracy": "highest accuracy",
    "cheapest_at_llm_accuracy": "lowest cost with accuracy >= LLM alone",
    "cost_cap": "highest accuracy within the cost cap",
}


def config_snippet(threshold: float) -> tuple[str, str]:
    """(TOML, environment variable) that set the router threshold; ``repr`` keeps 1.0 a TOML float."""
    value = repr(float(threshold))
    return f"[router]\nthreshold = {value}", f"SHUNT_ROUTER__THRESHOLD={value}"


def choose(goal: str, method: str, point: Point | None) -> Choice:
    """Wrap a chosen point with its config snippet."""
    if point is None or point.threshold is None:
        return Choice(goal, method, None, None, None)
    toml, env = config_snippet(point.threshold)
    return Choice(goal, method, point, toml, env)


def choices(points: Sequence[Point], method: str, llm_accuracy: float, cost_cap: float | None) -> list[Choice]:
    """The threshold for each goal (the cost-cap goal only when a cap is given)."""
    out = [
        choose("best_accuracy", method, best_accuracy(points)),
        choose("cheapest_at_llm_accuracy", method, cheapest_reaching(points, llm_accuracy)),
    ]
    if cost_cap is not None:
        out.append(choose("cost_cap", method, best_under_cap(points, cost_cap)))
    return out


def recommended(found: Sequence[Choice], cost_cap: float | None) -> Choice:
    """The one to paste: the cost-cap choice when a cap is given, else the cheapest at LLM-alone accuracy,
    else (no threshold reaches it) the most accurate."""
    by_goal = {c.goal: c for c in found}
    order = ("cost_cap",) if cost_cap is not None else ("cheapest_at_llm_accuracy", "best_accuracy")
    for goal in order:
        if by_goal[goal].point is not None:
            return by_goal[goal]
    return by_goal[order[0]]


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``"0,0.5,0.9"`` -> sorted unique thresholds; ValueError for anything outside [0, 1] or not a number."""
    values = set()
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"not a number: {part.strip()!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"thresholds must be between 0 and 1, got {value}")
        values.add(value)
    if not values:
        raise ValueError("no thresholds given")
    return tuple(sorted(values))


# --- calibration ------------------------------------------------------------------------------------------------


# --- questions and the answer files ---------------------------------------------------------------------------


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


# --- the report ---------------------------------------------------------------------------------------------------


def point_json(point: Point) -> dict[str, Any]:
    """A point as plain data (the method's display name added)."""
    return {**asdict(point), "name": METHOD_NAMES[point.method]}


def choice_json(choice: Choice) -> dict[str, Any]:
    """A choice as plain data."""
    return {
        "goal": choice.goal,
        "description": GOALS[choice.goal],
        "method": choice.method,
        "threshold": choice.point.threshold if choice.point else None,
        "point": point_json(choice.point) if choice.point else None,
        "toml": choice.toml,
        "env": choice.env,
    }


def calibration_json(bins: Sequence[Bin], plot: str) -> dict[str, Any]:
    """The reliability diagram's numbers and where it was drawn."""
    return {
        "bins": len(bins),
        "ece": expected_calibration_error(bins),
        "plot": plot,
        "table": [asdict(b) for b in bins],
    }


def sweep_json(swept: Mapping[Method, Sequence[Point]]) -> list[dict[str, Any]]:
    """One row per threshold with both methods side by side."""
    return [
        {"threshold": ds.threshold, "ds": point_json(ds), "ds_plus": point_json(plus)}
        for ds, plus in zip(swept["ds"], swept["ds_plus"], strict=True)
    ]
