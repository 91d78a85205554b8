"""``shunt train``: train, calibrate and evaluate the default small model on the shared Amazon reviews.

The 20% test split is stratified by label and domain, fixed by ``--seed``, and never seen by training
(not by the tokenizer, the weights, the choice of C or the temperature). The written folder is loaded
back with the service's own scorer and the test figures are computed from it, so they describe exactly
what ships. A TF-IDF + logistic regression baseline is tuned and calibrated the same way beside it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer

from consumer import logs
from consumer.config import DEFAULT_MODEL_DIR
from consumer.offline import datasets, training
from consumer.small.scoring import OnnxScorer

console = Console(stderr=True)


def _domains(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def test_logits(folder: Path, texts: Sequence[str], max_tokens: int) -> training.Floats:
    """Raw logits of the written folder, through the same tokenizer and graph the service runs."""
    scorer = OnnxScorer.load(folder, max_tokens=max_tokens)
    chunks = [scorer.logits(scorer.encode(texts[i : i + 256])) for i in range(0, len(texts), 256)]
    return np.concatenate(chunks).astype(np.float64)


def run_training(
    rows: list[dict[str, Any]], out: Path, config: training.TrainConfig, test_share: float, baseline: bool
) -> dict[str, Any]:
    """Split, train, write, evaluate; return the metrics document."""
    train_rows, test_rows = datasets.split_amazon(rows, test_share=test_share, seed=config.seed)
    labels = tuple(sorted({str(row["label"]) for row in rows}))
    texts = [str(row["text"]) for row in train_rows]
    targets = training.one_hot([str(row["label"]) for row in train_rows], labels)
    console.print(f"[bold]train[/] {len(train_rows)} reviews, [bold]test[/] {len(test_rows)} (never seen)")
    started = time.perf_counter()
    trained = training.train(texts, targets, labels, config=config, progress=console.print)
    train_seconds = time.perf_counter() - started
    version = training.write_model_folder(out, trained)
    test_texts = [str(row["text"]) for row in test_rows]
    truth = training.one_hot([str(row["label"]) for row in test_rows], labels).argmax(axis=1)
    logits = test_logits(out, test_texts, config.max_tokens)
    ours = training.evaluate(logits, truth, trained.temperature)
    ours["accuracy_by_domain"] = _by_domain(logits, truth, [str(row.get("domain")) for row in test_rows])
    # Truncating at max + 1 tells which reviews are longer than max without tokenising them whole twice.
    longer = training.encode_ids(trained.tokenizer, test_texts, config.max_tokens + 1)
    ours["share_truncated"] = float(np.mean([len(ids) > config.max_tokens for ids in longer]))
    metrics: dict[str, Any] = {
        "model": {"version": version, "cv": _cv(trained.cv), "train_seconds": round(train_seconds, 1)},
        "data": _data_summary(rows, train_rows, test_rows, config.seed, test_share),
        "test": ours,
    }
    if baseline:
        metrics["baseline"] = _baselines(texts, targets, test_texts, truth, trained.tokenizer, config)
    return metrics


def _by_domain(logits: training.Floats, truth: training.Ints, domains: list[str]) -> dict[str, float]:
    names = np.asarray(domains)
    correct = logits.argmax(axis=1) == truth
    return {domain: round(float(correct[names == domain].mean()), 4) for domain in sorted(set(domains))}


def _baselines(
    texts: list[str],
    targets: training.Floats,
    test_texts: list[str],
    truth: training.Ints,
    tokenizer: Tokenizer,
    config: training.TrainConfig,
) -> dict[str, Any]:
    """TF-IDF + LR on the full texts, and on only what the first ``max_tokens`` tokens cover (as ours)."""
    prefix = config.max_tokens
    variants: dict[str, tuple[list[str], list[str]]] = {
        "full_text": (texts, test_texts),
        "same_prefix": (
            training.token_prefix(tokenizer, texts, prefix),
            training.token_prefix(tokenizer, test_texts, prefix),
        ),
    }
    out: dict[str, Any] = {}
    for name, (fit_texts, eval_texts) in variants.items():
        console.print(f"[bold]baseline[/] TF-IDF (1-2 grams) + logistic regression, {name.replace('_', ' ')}")
        logits, temperature, cv = training.tfidf_baseline(fit_texts, targets, eval_texts, config, console.print)
        out[name] = {"cv": _cv(cv), "test": training.evaluate(logits, truth, temperature)}
    return out


def _cv(cv: training.CrossValidation) -> dict[str, Any]:
    return {"c": cv.c, "accuracy_by_c": {f"{c:g}": round(a, 4) for c, a in cv.accuracy.items()}}


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


def render(metrics: dict[str, Any]) -> list[Table]:
    """The headline table (ours vs the baselines) and the confidence-decile table."""
    tokens = metrics["options"]["max_tokens"]
    rows = [(f"ours, {tokens} tok", metrics["test"])]
    short = {"full_text": "tfidf+LR, full", "same_prefix": f"tfidf+LR, {tokens} tok"}
    rows += [(short[name], result["test"]) for name, result in metrics.get("baseline", {}).items()]
    headline = Table(title="held-out test split")
    headline.add_column("model")
    for column in ("accuracy", "ECE before", "ECE after", "NLL after", "temperature"):
        headline.add_column(column, justify="right")
    for name, result in rows:
        figures = ("accuracy", "ece_before", "ece_after", "nll_after")
        headline.add_row(name, *(f"{result[key]:.4f}" for key in figures), f"{result['temperature']:.3f}")
    deciles = Table(title="accuracy of the most confident reviews (after calibration)")
    deciles.add_column("most confident", justify="right")
    deciles.add_column("confidence >=", justify="right")
    for name, _result in rows:
        deciles.add_column(name, justify="right")
    for i, decile in enumerate(metrics["test"]["deciles"]):
        accuracies = [f"{result['deciles'][i]['accuracy']:.4f}" for _name, result in rows]
        deciles.add_row(f"{decile['share']:.0%}", f"{decile['min_confidence']:.3f}", *accuracies)
    return [headline, deciles]


@click.command(name="train")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Default: env SHUNT_DATA_DIR.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_MODEL_DIR, show_default=True)
@click.option("--seed", type=int, default=datasets.DEFAULT_SPLIT_SEED, show_default=True, help="Split and fold seed.")
@click.option("--domains", help="Comma-separated subset, e.g. books,dvd (train and test on these only).")
@click.option("--test-share", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True)
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="Also fit TF-IDF + LR.")
@click.option("--vocab-size", type=click.IntRange(100, 200_000), default=20_000, show_default=True)
@click.option("--max-tokens", type=click.IntRange(8, 4096), default=256, show_default=True, help="Truncation.")
@click.option(
    "--buckets", type=click.IntRange(2**8, 2**24), default=2**18, show_default=True, help="Bigram hash buckets."
)
def command(
    data_dir: Path | None,
    out: Path,
    seed: int,
    domains: str | None,
    test_share: float,
    baseline: bool,
    vocab_size: int,
    max_tokens: int,
    buckets: int,
) -> None:
    """Train and calibrate the small model; write the model folder and metrics.json; print the figures."""
    logs.configure("warning")
    rows = datasets.load_amazon(data_dir, _domains(domains))
    config = training.TrainConfig(vocab_size=vocab_size, buckets=buckets, max_tokens=max_tokens, seed=seed)
    metrics = run_training(rows, out, config, test_share, baseline)
    metrics["options"] = {"seed": seed, "domains": _domains(domains), "test_share": test_share}
    metrics["options"] |= {"vocab_size": vocab_size, "buckets": buckets, "max_tokens": max_tokens}
    (out / "metrics.json").write_bytes(orjson.dumps(metrics, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    for table in render(metrics):
        Console().print(table)
    console.print(f"wrote {out} ({metrics['model']['version']}) and {out / 'metrics.json'}")
