"""``shunt train``: train, calibrate and evaluate the default small model on the shared Amazon reviews.

The 20% test split is stratified by label and domain, fixed by ``--seed``, and never seen by training
(not by the tokenizer, the weights, the choice of C or the temperature). The written folder is loaded
back with the service's own scorer and the test figures are computed from it, so they describe exactly
what ships. A TF-IDF + logistic regression baseline is tuned and calibrated the same way beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from consumer import logs
from consumer.config import DEFAULT_MODEL_DIR
from consumer.offline import datasets
from consumer.offline.train import FinalModel, TrainConfig, run_training

console = Console(stderr=True)
DEFAULT = TrainConfig()


def _domains(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def _extra_rows(data_dir: Path | None, weight: float) -> tuple[list[dict[str, Any]], float]:
    """The UCI sentences and their weight; none (weight 0) when switched off or not in the data folder."""
    if weight <= 0:
        return [], 0.0
    if not (datasets.data_dir(data_dir) / datasets.UCI_SENTENCES).is_file():
        console.print(f"[yellow]no {datasets.UCI_SENTENCES} in the data folder: training without it[/]")
        return [], 0.0
    return datasets.load_uci(data_dir), weight


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
@click.option(
    "--max-tokens", type=click.IntRange(8, 4096), default=DEFAULT.max_tokens, show_default=True, help="Truncation."
)
@click.option(
    "--buckets", type=click.IntRange(2**8, 2**24), default=2**18, show_default=True, help="Bigram hash buckets."
)
@click.option(
    "--negation-window",
    type=click.IntRange(0, 8),
    default=DEFAULT.negation_window,
    show_default=True,
    help="Mark unigrams up to this many tokens after a negator (0: off).",
)
@click.option(
    "--final-model",
    type=click.Choice(["fold_average", "refit"]),
    default=DEFAULT.final_model,
    show_default=True,
    help="Ship the average of the chosen C's fold models (what the temperature was fitted on) or refit on all.",
)
@click.option(
    "--uci-weight",
    type=click.FloatRange(0.0, 10.0),
    default=0.5,
    show_default=True,
    help=f"Sample weight of {datasets.UCI_SENTENCES} added to every fit (0: not used).",
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
    negation_window: int,
    final_model: FinalModel,
    uci_weight: float,
) -> None:
    """Train and calibrate the small model; write the model folder and metrics.json; print the figures."""
    logs.configure("warning")
    rows = datasets.load_amazon(data_dir, _domains(domains))
    extra_rows, uci_weight = _extra_rows(data_dir, uci_weight)
    config = TrainConfig(
        vocab_size=vocab_size,
        buckets=buckets,
        max_tokens=max_tokens,
        negation_window=negation_window,
        seed=seed,
        final_model=final_model,
    )
    metrics = run_training(
        rows, out, config, test_share, baseline, progress=console.print, extra_rows=extra_rows, extra_weight=uci_weight
    )
    metrics["options"] = {"seed": seed, "domains": _domains(domains), "test_share": test_share}
    metrics["options"] |= {"vocab_size": vocab_size, "buckets": buckets, "max_tokens": max_tokens}
    metrics["options"] |= {"negation_window": negation_window, "uci_weight": uci_weight, "final_model": final_model}
    (out / "metrics.json").write_bytes(orjson.dumps(metrics, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    for table in render(metrics):
        Console().print(table)
    console.print(f"wrote {out} ({metrics['model']['version']}) and {out / 'metrics.json'}")
