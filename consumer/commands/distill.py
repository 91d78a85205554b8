"""``shunt distill``: retrain the small model from the LLM's answers (L4S), gate it, optionally promote it.

Reads the distill topic to its current end (or a JSONL file of distill records), runs the two-stage
distillation of :mod:`consumer.offline.distill`, prints what changed, and writes ``<out>/<version>`` with a
``distill.json`` report only when the candidate is not worse on the original held-out set. ``--promote``
then flips a symlink to it, and a service watching that link loads it between two batches.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from consumer import logs
from consumer.commands.common import config_option
from consumer.commands.render import percent, points
from consumer.config import Settings, load_settings
from consumer.offline import distill

console = Console(stderr=True)
EXIT_REJECTED = 3  # scripts tell "ran, candidate not good enough" from a usage error (2) or a crash (1)
_FIGURES = (("accuracy", "accuracy"), ("shunt_rate", "shunt rate"), ("kept_accuracy", "kept accuracy"), ("ece", "ECE"))


def _split(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def render(report: dict[str, Any]) -> Table:
    """One row per held-out set and figure: the base model, stage 1 alone (for contrast: what fitting only the
    hard reviews would do), the new candidate, and the change from base to candidate in points."""
    table = Table(title=f"{report['base']['version']} -> {report['candidate']['version']}")
    for column in ("held-out set", "n", "figure", "base", "stage 1", "new", "change"):
        left = column in ("held-out set", "figure")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    for name, entry in report["evaluation"].items():
        label = _set_title(name, entry["gate"])
        for key, title in _FIGURES:
            values = [entry.get(model, {}).get(key) for model in ("base", "stage1_only", "candidate")]
            table.add_row(
                label, str(entry["base"]["n"]), title, *(percent(v, 2) for v in values), points(entry["change"][key])
            )
            label = ""
    return table


def _set_title(name: str, gate: bool) -> str:
    if name == "hard_holdout":
        return "hard (vs LLM)"
    return name.removesuffix("_holdout") + (" (gate)" if gate else "")


def _config(options: dict[str, Any], settings: Settings, base: Path) -> distill.DistillConfig:
    train = distill.train_config(base, options["vocab_size"], settings.model.max_tokens)
    threshold = options["threshold"] if options["threshold"] is not None else settings.router.threshold
    return distill.DistillConfig(
        new_weight=options["new_weight"],
        max_new_share=options["max_new_share"],
        llm_accuracy=options["llm_accuracy"],
        holdout_share=options["holdout_share"],
        tolerance=options["tolerance"] / 100,
        threshold=threshold,
        seed=options["seed"],
        original_targets=options["original_targets"],
        self_weight=options["self_weight"],
        train=train,
    )


def _settings(options: dict[str, Any]) -> Settings:
    overrides: dict[str, Any] = {}
    if options["bootstrap"]:
        overrides["kafka"] = {"bootstrap_servers": options["bootstrap"]}
    if options["topic"]:
        overrides["topics"] = {"distill": options["topic"]}
    settings = load_settings(options["config_path"], overrides)
    secrets = [s.get_secret_value() for s in (settings.llm.resolved_api_key(), settings.kafka.sasl_password) if s]
    logs.configure("warning", "auto", secrets)  # training logs would drown the tables
    return settings


@click.command(name="distill")
@config_option
@click.option("--bootstrap", help="Kafka bootstrap servers (kafka.bootstrap_servers); read the distill topic there.")
@click.option("--topic", help="The distill topic (topics.distill, default reviews.distill).")
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read distill.v1 records from this JSONL file instead of the topic.")  # fmt: skip
@click.option("--self-labels/--no-self-labels", default=True, show_default=True,
              help="Also train on the small path's own outputs (topics.output joined by id to topics.input's "
                   "reviews): the rest of a new domain, which the distill topic never holds.")  # fmt: skip
@click.option("--self-labels-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Self-labels from this JSONL file of {"id", "text", "label"} instead of the topics.')  # fmt: skip
@click.option("--base-model", type=click.Path(file_okay=False, path_type=Path),
              help="The model to improve (default model.path).")  # fmt: skip
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Default: env SHUNT_DATA_DIR.")
@click.option("--domains", help="Original data domains (default: those the base model was trained on).")
@click.option("--report-domains", help="Also report on the held-out split of these domains, e.g. kitchen.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where <version>/ is written (default: the base model's parent folder).")  # fmt: skip
@click.option("--promote", type=click.Path(path_type=Path), help="Flip this symlink to the new folder.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the JSON report here (written even when the candidate is rejected).")  # fmt: skip
@click.option("--holdout-share", type=click.FloatRange(0.0, 0.9), default=0.2, show_default=True,
              help="Share of distill records held out (by a hash of the id), never trained on.")  # fmt: skip
@click.option("--tolerance", type=click.FloatRange(0.0, 100.0), default=0.5, show_default=True,
              help="Accuracy points the candidate may lose on the original held-out set.")  # fmt: skip
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), help="Shunt rates at this confidence (router.threshold).")
@click.option("--new-weight", type=click.FloatRange(0.0, min_open=True), default=1.0, show_default=True,
              help="Weight of one LLM-labelled review relative to one original review.")  # fmt: skip
@click.option("--max-new-share", type=click.FloatRange(0.01, 0.99), default=0.5, show_default=True,
              help="Cap on the LLM-labelled reviews' share of the total weight.")  # fmt: skip
@click.option(
    "--self-weight",
    type=click.FloatRange(0.0),
    default=1.0,
    show_default=True,
    help="Weight of one self-label relative to one original review (together at most the original's).",
)
@click.option(
    "--original-targets",
    type=click.Choice(["labels", "base"]),
    default="labels",
    show_default=True,
    help="Train the original reviews on their labels, or on the base model's probabilities.",
)
@click.option("--llm-accuracy", type=click.FloatRange(0.5, 1.0), default=0.94, show_default=True,
              help="How often the LLM is right; its labels are smoothed by the rest.")  # fmt: skip
@click.option("--vocab-size", type=click.IntRange(100, 200_000), default=20_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the hold-out hash.")
@click.option("--timeout", type=click.FloatRange(1.0), default=120.0, show_default=True,
              help="Seconds to read the topic to its end.")  # fmt: skip
def command(**options: Any) -> None:
    """Retrain the small model from the LLM's answers (two-stage distillation); keep it only if it is not
    worse on the original held-out set. Exit status 3 when the candidate is rejected (nothing written)."""
    settings = _settings(options)
    base = options["base_model"] or settings.model.path
    rows, source = distill.load_records(settings, options["file"], options["timeout"], progress=console.print)
    console.print(f"{len(rows)} distill rows from {source}")
    report_domains = _split(options["report_domains"]) or []
    inputs = distill.build_inputs(
        base, rows, options["data_dir"], _split(options["domains"]), report_domains, progress=console.print,
        self_labels=_self_labels(options, settings),
    )  # fmt: skip
    outcome = distill.run(inputs, options["out"], _config(options, settings, base), console.print)
    Console().print(render(outcome.report))
    _summarise(outcome.report)
    if options["report_path"] is not None:
        options["report_path"].write_bytes(
            orjson.dumps(outcome.report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        )
    if outcome.path is None:
        sys.exit(EXIT_REJECTED)  # not click's Exit: `shunt` runs click with standalone_mode=False, which swallows it
    console.print(f"wrote {outcome.path} with {distill.REPORT_FILE}")
    if options["promote"] is not None:
        distill.promote(options["promote"], outcome.path)
        console.print(f"promoted: {options['promote']} -> {outcome.path}")


def _self_labels(options: dict[str, Any], settings: Settings) -> list[distill.SelfLabel]:
    """From --self-labels-file; else, reading the distill topic, from the output and input topics."""
    file = options["self_labels_file"]
    if file is None and (options["file"] is not None or not options["self_labels"]):
        return []
    found, source = distill.load_self_labels(settings, file, options["timeout"], progress=console.print)
    console.print(f"{len(found)} self-labels from {source}")
    return found


def _summarise(report: dict[str, Any]) -> None:
    data, stages, verdict = report["data"], report["training"], report["verdict"]
    console.print(
        f"records {data['records']} (duplicates {data['duplicates']}, unknown label {data['unknown_label']}, "
        f"in test sets {data['in_evaluation_sets']}): trained on {data['train']}, held out {data['holdout']}; "
        f"{data['self_labels']} self-labels"
    )
    for name, entry in report["evaluation"].items():
        flips, change = entry["flips"], entry["change"]["accuracy"]
        if change is not None and flips["change_se"] is not None:
            console.print(
                f"{_set_title(name, entry['gate'])}: fixed {flips['fixed']}, broke {flips['broken']}; accuracy "
                f"{change * 100:+.2f} ± {flips['change_se'] * 100:.2f} points (paired standard error)"
            )
    console.print(f"stage 1: {stages['stage1']}")
    console.print(f"stage 2: {stages['stage2']}")
    colour = "green" if verdict["passed"] else "red"
    console.print(f"[{colour}]{'PASSED' if verdict['passed'] else 'REJECTED'}[/]: {verdict['reason']}")
