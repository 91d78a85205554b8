"""Benchmark: how many reviews per second the small model scores, and where the time goes.

    .venv/bin/python -m ops.bench.scorer [--model DIR] [--out .bench/scorer.json] [--repeats 5]

For batch sizes 1, 8, 32 and 128, on reviews of typical length, four rates (reviews/s, median of the
repeats): tokenisation alone (``encode_batch_fast`` with truncation, as the scorer calls it), encode
(tokenisation + the numpy feeds), the graph alone (``session.run`` on feeds built beforehand: the
ceiling), and end to end (``scorer.predict``: tokenise + inference + softmax + Prediction objects). The
gap between "graph" and "end to end" is the cost of tokenisation and glue. Reviews come from
../shared/data when it is there (read at run time, never copied), else they are generated. The load
average is recorded because other processes on a 2-core machine change every figure.

``--with-baseline`` adds a fifth column: the TF-IDF (1-2 grams) + logistic regression baseline of
``shunt train`` (fitted here on the training split, C=30 as its cross-validation chose), scoring the same
batches in-process with scikit-learn (``predict_proba(vectorizer.transform(batch))``).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import onnxruntime
import orjson
import tokenizers
from rich.console import Console
from rich.table import Table
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from consumer import logs
from consumer.config import DEFAULT_MODEL_DIR, ModelConfig
from consumer.offline.datasets import load_amazon, split_amazon
from consumer.small.scoring import OnnxScorer
from ops.bench import data
from ops.bench.report import BENCH_DIR

BATCH_SIZES = (1, 8, 32, 128)
STAGES = ("tokenise", "encode", "graph", "end_to_end")


def review_texts(limit: int) -> tuple[list[str], str]:
    """Up to ``limit`` of :func:`ops.bench.data.review_texts`, shuffled with a fixed seed."""
    texts, source = data.review_texts()
    texts = list(texts)
    random.Random(1).shuffle(texts)
    return texts[:limit], source


def timed(
    work: dict[str, tuple[Callable[[Any], object], Sequence[Any]]], reviews: int, repeats: int
) -> dict[str, float]:
    """Median reviews/s of each stage over all its batches. Stages take turns within every repeat, so a
    burst of load from another process hits them alike; one untimed pass first warms every cache."""
    for run, batches in work.values():
        for batch in batches:
            run(batch)
    rates: dict[str, list[float]] = {stage: [] for stage in work}
    for _ in range(repeats):
        for stage, (run, batches) in work.items():
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            rates[stage].append(reviews / (time.perf_counter() - start))
    return {stage: statistics.median(values) for stage, values in rates.items()}


def tfidf_predictor() -> Callable[[Any], object]:
    """The baseline of ``shunt train`` fitted on the training split; timed for speed only."""
    train_rows, _test = split_amazon(load_amazon())
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x = vectorizer.fit_transform([row["text"] for row in train_rows])
    model = LogisticRegression(C=30.0, max_iter=5_000).fit(x, [row["label"] for row in train_rows])
    return lambda batch: model.predict_proba(vectorizer.transform(batch))


def bench_batch_size(
    scorer: OnnxScorer, texts: Sequence[str], size: int, repeats: int, baseline: Callable[[Any], object] | None
) -> dict[str, float]:
    """The rates for one batch size; batch 1 runs fewer reviews to keep the run short."""
    count = len(texts) if size > 1 else min(len(texts), 1024)
    batches = [list(texts[i : i + size]) for i in range(0, count - size + 1, size)]
    feeds = [scorer.encode(batch) for batch in batches]
    work: dict[str, tuple[Callable[[Any], object], Sequence[Any]]] = {
        "tokenise": (scorer.tokenizer.encode_batch_fast, batches),
        "encode": (scorer.encode, batches),
        "graph": (scorer.logits, feeds),
        "end_to_end": (scorer.predict, batches),
    }
    if baseline is not None:
        work["tfidf_lr"] = (baseline, batches)
    return timed(work, len(batches) * size, repeats)


def environment(scorer: OnnxScorer, texts: Sequence[str], source: str) -> dict[str, Any]:
    lengths = sorted(len(text) for text in texts)
    tokens = sorted(len(encoding.ids) for encoding in scorer.tokenizer.encode_batch(list(texts[:2000])))
    return {
        "model_version": scorer.version,
        "max_tokens": scorer.max_tokens,
        "texts": source,
        "reviews": len(texts),
        "median_chars": lengths[len(lengths) // 2],
        "median_tokens": tokens[len(tokens) // 2],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": tokenizers.__version__,
        "load_average_start": os.getloadavg()[0],
    }


def render(results: dict[int, dict[str, float]], env: dict[str, Any]) -> Table:
    table = Table(title=f"scorer throughput, reviews/s (median) — {env['model_version']}")
    table.add_column("batch", justify="right")
    stages = [stage for stage in (*STAGES, "tfidf_lr") if stage in next(iter(results.values()))]
    for stage in stages:
        table.add_column(stage.replace("_", " ").replace("tfidf lr", "TF-IDF+LR e2e"), justify="right")
    table.add_column("time outside graph", justify="right")
    for size, rates in results.items():
        cells = [f"{rates[stage]:,.0f}" for stage in stages]
        table.add_row(str(size), *cells, f"{1 - rates['end_to_end'] / rates['graph']:.0%}")
    return table


def caption(env: dict[str, Any]) -> str:
    return (
        f"{env['reviews']} reviews ({env['texts']}), median {env['median_chars']} chars / "
        f"{env['median_tokens']} tokens, truncation {env['max_tokens']}; {env['cpus']} CPUs, "
        f"intra-op threads {env['intra_op_threads']}; "
        f"1-min load average {env['load_average_start']:.2f} -> {env['load_average_end']:.2f}"
    )


@click.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_MODEL_DIR)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=BENCH_DIR / "scorer.json")
@click.option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--reviews", type=click.IntRange(128, 100_000), default=4096, show_default=True)
@click.option("--max-tokens", type=click.IntRange(8, 4096), default=ModelConfig().max_tokens, show_default=True)
@click.option("--intra-op-threads", type=click.IntRange(0, 64), default=0, show_default=True, help="0: ORT picks.")
@click.option("--with-baseline", is_flag=True, help="Also time the TF-IDF + LR baseline (needs the shared data).")
def main(
    model_dir: Path, out: Path, repeats: int, reviews: int, max_tokens: int, intra_op_threads: int, with_baseline: bool
) -> None:
    """Measure the scorer at batch sizes 1, 8, 32, 128 and write the figures as JSON."""
    logs.configure("warning")
    scorer = OnnxScorer.load(model_dir, max_tokens=max_tokens, intra_op_threads=intra_op_threads)
    texts, source = review_texts(reviews)
    env = environment(scorer, texts, source) | {"intra_op_threads": intra_op_threads}
    baseline = tfidf_predictor() if with_baseline else None
    results = {size: bench_batch_size(scorer, texts, size, repeats, baseline) for size in BATCH_SIZES}
    env["load_average_end"] = os.getloadavg()[0]
    console = Console()
    console.print(render(results, env))
    console.print(caption(env))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "repeats": repeats, "reviews_per_second": {str(k): v for k, v in results.items()}}
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    main()
