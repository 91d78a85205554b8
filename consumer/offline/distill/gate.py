"""Score the base model, stage 1 and the candidate on each held-out set with the same figures, count the
reviews the candidate fixed and broke, and decide the gate: not worse on the original held-out set."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from consumer.offline import train as training
from consumer.offline.distill.records import EvalSet
from consumer.small.calibration import softmax

_CHUNK = 256  # texts per scorer call: bounded memory for any data size


def chunked_probs(predict: Callable[[Sequence[str]], training.Floats], texts: Sequence[str]) -> training.Floats:
    """Probabilities for any number of texts, ``_CHUNK`` at a time."""
    if not texts:
        return np.zeros((0, 0))
    return np.concatenate([predict(texts[i : i + _CHUNK]) for i in range(0, len(texts), _CHUNK)])


def stage_probs(trained: training.TrainedModel) -> Callable[[Sequence[str]], training.Floats]:
    """A numpy scorer for an in-memory model (stage 1 is never exported; it is reported for contrast)."""

    def predict(texts: Sequence[str]) -> training.Floats:
        counts = training.count_matrix(trained.tokenizer, texts, trained.model.spec)
        return softmax(trained.model.logits(counts), trained.temperature)

    return predict


def metrics(probs: training.Floats, truth: Sequence[str], labels: Sequence[str], threshold: float) -> dict[str, Any]:
    """Accuracy, shunt rate (share below ``threshold``: what would go to the LLM), accuracy of what the
    small model keeps, and ECE."""
    if len(truth) == 0:
        return {"n": 0, "accuracy": None, "shunt_rate": None, "kept_accuracy": None, "ece": None}
    index = training.one_hot(truth, labels).argmax(axis=1)
    correct = probs.argmax(axis=1) == index
    kept = probs.max(axis=1) >= threshold
    return {
        "n": len(truth),
        "accuracy": float(correct.mean()),
        "shunt_rate": float(1.0 - kept.mean()),
        "kept_accuracy": float(correct[kept].mean()) if kept.any() else None,
        "ece": training.expected_calibration_error(probs, index),
    }


def compare(
    sets: Sequence[EvalSet], models: Mapping[str, Callable[[Sequence[str]], training.Floats]],
    labels: Sequence[str], threshold: float,
) -> dict[str, Any]:  # fmt: skip
    """Per set: each model's metrics, the candidate's change against the base, and which reviews flipped."""
    out: dict[str, Any] = {}
    for found in sets:
        entry: dict[str, Any] = {"gate": found.gate}
        probs = {name: chunked_probs(predict, found.texts) for name, predict in models.items()}
        for name, matrix in probs.items():
            entry[name] = metrics(matrix, found.truth, labels, threshold)
        entry["change"] = {
            key: _delta(entry["candidate"][key], entry["base"][key])
            for key in ("accuracy", "shunt_rate", "kept_accuracy", "ece")
        }
        entry["flips"] = flips(probs["base"], probs["candidate"], found.truth, labels)
        out[found.name] = entry
    return out


def flips(
    base: training.Floats, candidate: training.Floats, truth: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Reviews the candidate fixed and broke, and the standard error of the accuracy change (paired), so a
    change of a point or two on a few hundred reviews can be told from noise."""
    if len(truth) == 0:
        return {"fixed": 0, "broken": 0, "change_se": None}
    index = training.one_hot(truth, labels).argmax(axis=1)
    before, after = base.argmax(axis=1) == index, candidate.argmax(axis=1) == index
    diff = after.astype(np.float64) - before.astype(np.float64)
    n = len(truth)
    se = float(np.sqrt(max(diff.var(), 0.0) / n)) if n > 1 else None
    return {"fixed": int((after & ~before).sum()), "broken": int((before & ~after).sum()), "change_se": se}


def _delta(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else new - old


def verdict(evaluation: Mapping[str, Any], tolerance: float) -> tuple[bool, str]:
    """Passes when the candidate's accuracy on every gated set is at least the base's minus ``tolerance``."""
    for name, entry in evaluation.items():
        change = entry["change"]["accuracy"]
        if entry["gate"] and change is not None and change < -tolerance:
            return False, f"{name}: accuracy {change * 100:+.2f} points, below the tolerance of -{tolerance * 100:.2f}"
    return True, f"not worse than the base beyond {tolerance * 100:.2f} points on the original held-out set"
