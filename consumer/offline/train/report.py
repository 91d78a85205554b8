"""How a trained model does on held-out data (accuracy, NLL and ECE before and after the temperature,
confidence deciles, threshold coverage), and the TF-IDF + logistic regression baseline tuned the same way."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from consumer.offline import selective
from consumer.offline.train.features import Floats, Ints, Progress
from consumer.offline.train.fit import CrossValidation, TrainConfig, cross_validate, fit_logistic
from consumer.small.calibration import RELIABILITY_BINS, ece_of, fit_temperature, nll, softmax


def expected_calibration_error(probs: Floats, truth: Ints, bins: int = RELIABILITY_BINS) -> float:
    """ECE of a probability matrix (:func:`consumer.small.calibration.ece_of`)."""
    return ece_of(probs, truth, bins)


def confidence_deciles(probs: Floats, truth: Ints) -> list[dict[str, float]]:
    """Accuracy of the 10%, 20%, ... 100% most confident predictions, with the confidence at each cut."""
    confidence = probs.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    correct = (probs.argmax(axis=1) == truth)[order]
    out = []
    for decile in range(1, 11):
        k = max(1, math.ceil(len(order) * decile / 10))
        out.append(
            {
                "share": decile / 10,
                "accuracy": float(correct[:k].mean()),
                "min_confidence": float(confidence[order[k - 1]]),
            }
        )
    return out


def aurc(probs: Floats, truth: Ints) -> float:
    """Area under the risk-coverage curve of a probability matrix (:func:`consumer.offline.selective.aurc`)."""
    return selective.aurc(probs.max(axis=1).tolist(), (probs.argmax(axis=1) == truth).tolist())


def evaluate(logits: Floats, truth: Ints, temperature: float) -> dict[str, Any]:
    """Accuracy, NLL and ECE before and after temperature scaling, and the confidence deciles after."""
    targets = np.eye(logits.shape[1])[truth]
    raw, tempered = softmax(logits), softmax(logits, temperature)
    return {
        "n": len(truth),
        "accuracy": float((logits.argmax(axis=1) == truth).mean()),
        "temperature": temperature,
        "nll_before": nll(logits, targets, 1.0),
        "nll_after": nll(logits, targets, temperature),
        "ece_before": expected_calibration_error(raw, truth),
        "ece_after": expected_calibration_error(tempered, truth),
        "deciles": confidence_deciles(tempered, truth),
        "aurc": aurc(tempered, truth),
        "thresholds": threshold_coverage(tempered, truth),
    }


def threshold_coverage(
    probs: Floats, truth: Ints, thresholds: Sequence[float] = (0.8, 0.9, 0.95, 0.99)
) -> list[dict[str, float]]:
    """For each routing threshold: the share the small model keeps (confidence >= t) and its accuracy there."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == truth
    out = []
    for threshold in thresholds:
        kept = confidence >= threshold
        accuracy = float(correct[kept].mean()) if kept.any() else float("nan")
        out.append({"threshold": threshold, "coverage": float(kept.mean()), "accuracy": accuracy})
    return out


def tfidf_baseline(
    train_texts: Sequence[str],
    train_targets: Floats,
    test_texts: Sequence[str],
    config: TrainConfig,
    progress: Progress | None = None,
) -> tuple[Floats, float, CrossValidation]:
    """Word 1-2 gram TF-IDF (sublinear tf, full text) + logistic regression, tuned and calibrated like ours.

    Returns the test logits, the out-of-fold temperature and the cross-validation record.
    """
    texts = np.asarray(train_texts, dtype=object)
    vectorised: dict[bytes, tuple[Any, Any]] = {}  # one vectorizer per fold, shared by every C

    def features(fit_texts: Any, eval_texts: Any, key: bytes) -> tuple[Any, Any]:
        if key not in vectorised:
            vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
            vectorised[key] = (vectorizer.fit_transform(fit_texts), vectorizer.transform(eval_texts))
        return vectorised[key]

    def fit_and_score(x_fit: Any, fit_targets: Floats, x_eval: Any, c: float) -> Floats:
        coef, bias = fit_logistic(x_fit, fit_targets, np.ones(x_fit.shape[0]), c, config.max_iter)
        out: Floats = np.asarray(x_eval @ coef) + bias
        return out

    def fold_logits(fit_idx: Ints, eval_idx: Ints, c: float) -> Floats:
        x_fit, x_eval = features(texts[fit_idx], texts[eval_idx], eval_idx.tobytes())
        return fit_and_score(x_fit, train_targets[fit_idx], x_eval, c)

    cv = cross_validate(fold_logits, train_targets, config, progress or (lambda _message: None))
    temperature = fit_temperature(cv.oof_logits, train_targets)
    x_train, x_test = features(texts, list(test_texts), b"all")
    return fit_and_score(x_train, train_targets, x_test, cv.c), temperature, cv
