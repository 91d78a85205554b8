"""The ``shunt train`` run: split the shared Amazon reviews, train, write the folder, and evaluate what was
written (loaded back with the service's own scorer) beside the TF-IDF + logistic regression baselines."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from consumer.offline import datasets
from consumer.offline.train.export import write_model_folder
from consumer.offline.train.features import Floats, Ints, Progress, encode_ids, one_hot, token_prefix
from consumer.offline.train.fit import CrossValidation, ExtraData, TrainConfig, train
from consumer.offline.train.report import evaluate, tfidf_baseline
from consumer.small.scoring import OnnxScorer


def test_logits(folder: Path, texts: Sequence[str], max_tokens: int) -> Floats:
    """Raw logits of the written folder, through the same tokenizer and graph the service runs."""
    scorer = OnnxScorer.load(folder, max_tokens=max_tokens)
    chunks = [scorer.logits(scorer.encode(texts[i : i + 256])) for i in range(0, len(texts), 256)]
    return np.concatenate(chunks).astype(np.float64)


def run_training(
    rows: list[dict[str, Any]],
    out: Path,
    config: TrainConfig,
    test_share: float,
    baseline: bool,
    *,
    progress: Progress,
    extra_rows: Sequence[dict[str, Any]] = (),
    extra_weight: float = 0.0,
) -> dict[str, Any]:
    """Split, train, write, evaluate; return the metrics document.

    ``extra_rows`` (e.g. the UCI sentences) join every fit with weight ``extra_weight``; they are never
    in a fold's evaluation, the temperature or the test split."""
    train_rows, test_rows = datasets.split_amazon(rows, test_share=test_share, seed=config.seed)
    labels = tuple(sorted({str(row["label"]) for row in rows}))
    texts = [str(row["text"]) for row in train_rows]
    targets = one_hot([str(row["label"]) for row in train_rows], labels)
    progress(f"[bold]train[/] {len(train_rows)} reviews, [bold]test[/] {len(test_rows)} (never seen)")
    extra = _extra_data(extra_rows, extra_weight, labels)
    started = time.perf_counter()
    trained = train(texts, targets, labels, config=config, progress=progress, extra=extra)
    train_seconds = time.perf_counter() - started
    version = write_model_folder(out, trained)
    test_texts = [str(row["text"]) for row in test_rows]
    truth = one_hot([str(row["label"]) for row in test_rows], labels).argmax(axis=1)
    ours = _test_figures(out, trained.tokenizer, trained.temperature, test_rows, truth, max_tokens=config.max_tokens)
    metrics: dict[str, Any] = {
        "model": {"version": version, "cv": _cv(trained.cv), "train_seconds": round(train_seconds, 1)},
        "data": _data_summary(rows, train_rows, test_rows, config.seed, test_share),
        "test": ours,
    }
    if baseline:
        metrics["baseline"] = _baselines(
            texts, targets, test_texts, truth, trained.tokenizer, config=config, progress=progress
        )
    return metrics


def _test_figures(
    out: Path,
    tokenizer: Tokenizer,
    temperature: float,
    test_rows: list[dict[str, Any]],
    truth: Ints,
    *,
    max_tokens: int,
) -> dict[str, Any]:
    """The written folder's figures on the test split, by domain, and the share it truncates."""
    test_texts = [str(row["text"]) for row in test_rows]
    logits = test_logits(out, test_texts, max_tokens)
    ours = evaluate(logits, truth, temperature)
    ours["accuracy_by_domain"] = _by_domain(logits, truth, [str(row.get("domain")) for row in test_rows])
    # Truncating at max + 1 tells which reviews are longer than max without tokenising them whole twice.
    longer = encode_ids(tokenizer, test_texts, max_tokens + 1)
    ours["share_truncated"] = float(np.mean([len(ids) > max_tokens for ids in longer]))
    return ours


def _extra_data(rows: Sequence[dict[str, Any]], weight: float, labels: Sequence[str]) -> ExtraData | None:
    if not rows or weight <= 0:
        return None
    targets = one_hot([str(row["label"]) for row in rows], labels)
    return ExtraData([str(row["text"]) for row in rows], targets, weight)


def _by_domain(logits: Floats, truth: Ints, domains: list[str]) -> dict[str, float]:
    names = np.asarray(domains)
    correct = logits.argmax(axis=1) == truth
    return {domain: round(float(correct[names == domain].mean()), 4) for domain in sorted(set(domains))}


def _baselines(
    texts: list[str],
    targets: Floats,
    test_texts: list[str],
    truth: Ints,
    tokenizer: Tokenizer,
    *,
    config: TrainConfig,
    progress: Progress,
) -> dict[str, Any]:
    """TF-IDF + LR on the full texts, and on only what the first ``max_tokens`` tokens cover (as ours)."""
    prefix = config.max_tokens
    variants: dict[str, tuple[list[str], list[str]]] = {
        "full_text": (texts, test_texts),
        "same_prefix": (
            token_prefix(tokenizer, texts, prefix),
            token_prefix(tokenizer, test_texts, prefix),
        ),
    }
    out: dict[str, Any] = {}
    for name, (fit_texts, eval_texts) in variants.items():
        progress(f"[bold]baseline[/] TF-IDF (1-2 grams) + logistic regression, {name.replace('_', ' ')}")
        logits, temperature, cv = tfidf_baseline(fit_texts, targets, eval_texts, config, progress)
        out[name] = {"cv": _cv(cv), "test": evaluate(logits, truth, temperature)}
    return out


def _cv(cv: CrossValidation) -> dict[str, Any]:
    return {
        "c": cv.c,
        "accuracy_by_c": {f"{c:g}": round(a, 4) for c, a in cv.accuracy.items()},
        "nll_by_c": {f"{c:g}": round(loss, 4) for c, loss in cv.nll.items()},
    }


def _data_summary(
    rows: list[dict[str, Any]],
    train_rows: list[dict[str, Any]],
    test_rows: list[dict[str, Any]],
    seed: int,
    share: float,
) -> dict[str, Any]:
    return {
        "file": datasets.AMAZON_TRAIN,
        "source": "Multi-Domain Sentiment Dataset (Blitzer, Dredze & Pereira, ACL 2007)",
        "rows": len(rows),
        "domains": sorted({str(row.get("domain")) for row in rows}),
        "split_seed": seed,
        "test_share": share,
        "train": len(train_rows),
        "test": len(test_rows),
    }
