"""Two-stage confidence distillation (docs/l4s.md):

* **stage 1** fits the LLM-labelled hard reviews alone. Its out-of-fold probabilities say, for each
  record, whether a model that never saw that record agrees with the LLM: the record's *confidence*.
* **stage 2** fits the mix: the original training data with its labels (or, ``original_targets="base"``,
  the old model's probabilities) and the extra data the base model was trained with, so it does not forget;
  the stream's self-labels (the small path's own confident outputs) so it learns the rest of a new domain;
  and the hard reviews with the LLM's labels smoothed by the LLM's accuracy, each weighted by its stage-1
  confidence, their total weight capped so they never swamp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from consumer.offline import train as training
from consumer.offline.distill.records import DistillRecord, Row
from consumer.offline.distill.selflabels import SelfLabel, cap_weight
from consumer.small.calibration import fit_temperature, softmax

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class DistillConfig:
    """Knobs of :func:`run`; docs/l4s.md says why each default is what it is."""

    new_weight: float = 1.0  # one LLM-labelled review counts like one original review ...
    max_new_share: float = 0.5  # ... but together they never carry more than this share of the weight
    llm_accuracy: float = 0.94  # how often the LLM is right: the smoothing of its labels
    holdout_share: float = 0.2
    tolerance: float = 0.005  # the gate: at most this much accuracy lost on the original held-out set
    threshold: float = 0.9  # the router threshold at which shunt rates are reported
    seed: int = 0
    keep_tokenizer: bool = False  # True: reuse the base model's tokenizer instead of one fitted on the mix
    confidence_weights: bool = True  # False: every new record weighs the same (stage 1 is then a diagnostic)
    original_targets: Literal["labels", "base"] = "labels"  # base: the old model's probabilities (a teacher)
    self_weight: float = 1.0  # one self-label counts like one original review, together at most as much
    train: training.TrainConfig = field(default_factory=training.TrainConfig)


@dataclass(frozen=True, slots=True)
class StageOne:
    """Stage 1's model (None when the records were too few to fit it) and each record's confidence."""

    trained: training.TrainedModel | None
    confidence: training.Floats
    note: str


@dataclass(frozen=True, slots=True)
class Candidate:
    trained: training.TrainedModel
    stage1: StageOne
    new_weight: float
    summary: dict[str, Any]


def llm_targets(llm_labels: Sequence[str], labels: Sequence[str], accuracy: float) -> training.Floats:
    """The LLM's labels as probabilities: ``accuracy`` on its label, the rest spread over the others.

    The expected cross-entropy against the (unknown) true label, when the LLM is right with probability
    ``accuracy`` and its errors are spread evenly, is exactly the cross-entropy against these targets.
    """
    hard = training.one_hot(llm_labels, labels)
    rest = (1.0 - accuracy) / (len(labels) - 1)
    out: training.Floats = hard * (accuracy - rest) + rest
    return out


def stage_one(
    texts: Sequence[str], targets: training.Floats, labels: Sequence[str], tokenizer: Tokenizer,
    config: training.TrainConfig,
) -> StageOne:  # fmt: skip
    """Fit the hard reviews alone; confidence = out-of-fold P(LLM label) / max out-of-fold P, so a record
    whose label an unseeing model also picks weighs fully, one it contradicts weighs less."""
    hard = targets.argmax(axis=1)
    counts = np.bincount(hard, minlength=len(labels))
    if counts.min() < config.folds:
        note = f"skipped: needs {config.folds} records per label, has {dict(zip(labels, counts.tolist(), strict=True))}"
        return StageOne(None, np.ones(len(texts)), note)
    trained = training.train(texts, targets, labels, config=config, tokenizer=tokenizer)
    probs = softmax(trained.cv.oof_logits, trained.temperature)
    confidence = probs[np.arange(len(hard)), hard] / probs.max(axis=1)
    return StageOne(trained, confidence, "fitted")


def new_weight(confidence: training.Floats, n_old: int, config: DistillConfig) -> float:
    """The per-record weight of the new data: ``new_weight``, lowered so their total stays within
    ``max_new_share`` of all the weight."""
    cap_total = config.max_new_share / (1.0 - config.max_new_share) * n_old
    total = float(confidence.sum())
    return min(config.new_weight, cap_total / total) if total > 0 else config.new_weight


@dataclass(frozen=True, slots=True)
class Mix:
    """Stage 2's data besides the LLM's records: the original rows with their targets, the self-labels,
    and the extra data (e.g. the UCI sentences) the base model was trained with."""

    old: Sequence[Row]
    old_targets: training.Floats | None  # None: the rows' own labels
    self_labels: Sequence[SelfLabel] = ()
    extra: training.ExtraData | None = None


def two_stage(
    mix: Mix, new: Sequence[DistillRecord], labels: Sequence[str], *,
    config: DistillConfig, progress: Progress, tokenizer: Tokenizer | None = None,
) -> Candidate:  # fmt: skip
    """Stage 1 on the new records, stage 2 on the mix; the temperature is refitted against the truth.

    Without ``tokenizer`` one is fitted on the mix, so the new domain's words get whole tokens too."""
    old_texts, self_texts, new_texts = (
        [str(r["text"]) for r in mix.old],
        [s.text for s in mix.self_labels],
        [r.text for r in new],
    )
    train_config = config.train
    if tokenizer is None:
        progress(f"tokenizer: BPE (vocab {train_config.vocab_size}) on {len(old_texts)} original + "
                 f"{len(self_texts)} self-labelled + {len(new)} new")  # fmt: skip
        tokenizer = training.train_tokenizer(
            old_texts + self_texts + new_texts, train_config.vocab_size, train_config.min_frequency
        )
    new_targets = llm_targets([r.llm_label for r in new], labels, config.llm_accuracy)
    progress(f"stage 1: {len(new)} LLM-labelled hard reviews alone")
    first = stage_one(new_texts, new_targets, labels, tokenizer, train_config)
    confidence = first.confidence if config.confidence_weights else np.ones(len(new))
    weight = new_weight(confidence, len(mix.old), config)
    self_weight = cap_weight(len(self_texts), len(mix.old), config.self_weight)
    self_targets = training.one_hot([s.label for s in mix.self_labels], labels)
    old_truth = training.one_hot([str(r["label"]) for r in mix.old], labels)
    old_targets = old_truth if mix.old_targets is None else mix.old_targets
    weights = np.concatenate([np.ones(len(mix.old)), np.full(len(self_texts), self_weight), weight * confidence])
    progress(f"stage 2: {len(mix.old)} original + {len(self_texts)} self-labelled (weight {self_weight:.3g}) + "
             f"{len(new)} new (weight {weight:.3g})")  # fmt: skip
    mixed = training.train(
        old_texts + self_texts + new_texts, np.vstack([old_targets, self_targets, new_targets]), labels,
        sample_weight=weights, config=train_config, tokenizer=tokenizer, progress=progress, extra=mix.extra,
    )  # fmt: skip
    # The temperature is fitted where the label is the truth or the stream's own: the original rows and the
    # self-labels, a fair sample of what the router will see. Not on the LLM's records: they are the hardest
    # reviews by selection and 1 - llm_accuracy of their labels are wrong, so they would make every review
    # look less certain than it is (docs/l4s.md: shunt rate on a new domain -21% relative with them, -24%
    # without, the same accuracy).
    known = np.vstack([old_truth, self_targets])
    temperature = fit_temperature(mixed.cv.oof_logits[: len(known)], known)
    trained = dataclasses.replace(mixed, temperature=temperature)
    summary = _training_summary(first, trained, weight, weights, len(mix.old) + len(self_texts))
    summary["stage2"] |= {"self_labels": len(self_texts), "self_label_weight": round(self_weight, 4)}
    return Candidate(trained, first, weight, summary)


def _training_summary(
    first: StageOne, trained: training.TrainedModel, weight: float, weights: training.Floats, n_known: int
) -> dict[str, Any]:
    stage1: dict[str, Any] = {"status": first.note, "mean_confidence": round(float(first.confidence.mean()), 4),
                              "agreeing_share": round(float((first.confidence >= 1.0).mean()), 4)}  # fmt: skip
    if first.trained is not None:
        stage1 |= {"c": first.trained.cv.c, "cv_accuracy": round(first.trained.cv.accuracy[first.trained.cv.c], 4)}
    new_total = float(weights[n_known:].sum())
    return {
        "stage1": stage1,
        "stage2": {
            "c": trained.cv.c,
            "cv_accuracy": round(trained.cv.accuracy[trained.cv.c], 4),
            "temperature": round(trained.temperature, 4),
            "new_record_weight": round(weight, 4),
            "new_weight_share": round(new_total / float(weights.sum()), 4),
        },
    }
