"""The inputs of ``shunt eval``: the labelled reviews, the small model's view of each, and the questions to
ask the LLM about them (built exactly as the service's pool builds them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from consumer.config import LlmConfig, Settings
from consumer.llm.prompting import Prompt, build_prompt
from consumer.offline.evaluation.answers import question_key, read_json_lines
from consumer.offline.evaluation.arithmetic import EvaluationError, Kind
from consumer.records import Origin, Prediction, Review, Scored


@dataclass(frozen=True, slots=True)
class Case:
    """One labelled review with the small model's view. ``review_id``: the data's own id, if it had one."""

    scored: Scored
    review_id: str | None
    truth: str


@dataclass(frozen=True, slots=True)
class Ask:
    """One question for the LLM: a review, a prompt kind, the prompt itself and its cache key."""

    case: int
    kind: Kind
    prompt: Prompt
    key: str


def check_price(llm: LlmConfig) -> None:
    """EvaluationError unless the config prices ``llm.model``: every cost figure depends on it."""
    if llm.model not in llm.prices:
        raise EvaluationError(
            f"no price for model {llm.model!r}: add [llm.prices.{llm.model}] with input_per_mtok and "
            f"output_per_mtok to the config (known: {', '.join(sorted(llm.prices))})"
        )


@dataclass(frozen=True, slots=True)
class Labelled:
    """One row of the data file."""

    review_id: str | None
    text: str
    label: str


def load_reviews(path: Path) -> list[Labelled]:
    """The data file's rows; each needs a string ``text`` and ``label``; ids, when given, must be unique."""
    out, seen = [], set()
    for number, row in read_json_lines(path, "data file"):
        text, label, raw_id = row.get("text"), row.get("label"), row.get("id")
        if not isinstance(text, str) or not text.strip() or not isinstance(label, str):
            raise EvaluationError(f"{path}:{number}: needs a non-empty string 'text' and a string 'label'")
        review_id = None if raw_id is None else str(raw_id)
        if review_id is not None and review_id in seen:
            raise EvaluationError(f"{path}:{number}: id {review_id!r} repeats; answers are matched by id")
        seen.add(review_id)
        out.append(Labelled(review_id, text, label))
    if not out:
        raise EvaluationError(f"{path} holds no reviews")
    return out


def score_reviews(reviews: Sequence[Labelled], settings: Settings) -> list[Case]:
    """The small model's prediction for every review, in batches of ``model.batch_size``."""
    from consumer.small.scoring import OnnxScorer  # noqa: PLC0415 - onnxruntime loads only when needed

    scorer = OnnxScorer.load(settings.model.path, max_tokens=settings.model.max_tokens)
    unknown = sorted({r.label for r in reviews} - set(scorer.labels))
    if unknown:
        raise EvaluationError(f"the data use labels {unknown} that the model does not know {list(scorer.labels)}")
    predictions: list[Prediction] = []
    size = settings.model.batch_size
    for start in range(0, len(reviews), size):
        predictions.extend(scorer.predict([r.text for r in reviews[start : start + size]]))
    return [
        _case(number, review, prediction)
        for number, (review, prediction) in enumerate(zip(reviews, predictions, strict=True))
    ]


def _case(number: int, review: Labelled, prediction: Prediction) -> Case:
    # The pool's logs bind topic/partition/offset: the data file stands in for the topic, the row for the offset.
    review_id = review.review_id if review.review_id is not None else f"row-{number + 1}"
    origin = Origin(topic="eval", partition=0, offset=number)
    return Case(Scored(Review(review_id, review.text, origin), prediction), review.review_id, review.label)


def make_asks(cases: Sequence[Case], llm: LlmConfig, highest: float) -> list[Ask]:
    """The plain prompt for every review; the S4L prompt for every review some threshold sends to the LLM."""
    asks = []
    for number, case in enumerate(cases):
        kinds: tuple[Kind, ...] = ("plain", "s4l") if case.scored.prediction.confidence < highest else ("plain",)
        for kind in kinds:
            prompt = _prompt(case.scored, kind, llm)
            asks.append(Ask(number, kind, prompt, question_key(prompt, llm.model)))
    return asks


def _prompt(scored: Scored, kind: Kind, llm: LlmConfig) -> Prompt:
    # Built exactly as LlmPool builds it, so the key names the question the pool really sends.
    probs = scored.prediction.probs
    return build_prompt(scored.review.text, probs, kind, prompt_mass=llm.prompt_mass, hint=llm.hint)
