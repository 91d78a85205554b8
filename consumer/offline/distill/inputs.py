"""What ``shunt distill`` distills: the records from the distill topic or a file, the base model's original
train/test split and the extra report domains, and the base model's feature space to train in."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson

from consumer.config import Settings, librdkafka_config
from consumer.offline import datasets
from consumer.offline import train as training
from consumer.offline.distill import selflabels
from consumer.offline.distill.records import has_strings, parse_records, provenance, read_file, read_topic
from consumer.offline.distill.runner import Inputs
from consumer.offline.distill.selflabels import SelfLabel
from consumer.offline.distill.stages import Progress


def load_records(
    settings: Settings, file: Path | None, timeout_s: float, *, progress: Progress
) -> tuple[list[Any], str]:
    """Raw rows and where they came from: the file, else the configured distill topic to its end."""
    if file is not None:
        return read_file(file), str(file)
    conf = librdkafka_config(settings.kafka, "consumer")
    topic = settings.topics.distill
    progress(f"reading {topic} at {settings.kafka.bootstrap_servers} from the beginning to its end")
    return read_topic(conf, topic, timeout_s), f"{topic}@{settings.kafka.bootstrap_servers}"


def load_self_labels(
    settings: Settings, file: Path | None, timeout_s: float, *, progress: Progress
) -> tuple[list[SelfLabel], str]:
    """The stream's self-labels: from a JSONL file of ``{"id", "text", "label"}``, else the small-path
    outputs on the output topic joined by id to the input topic's reviews."""
    if file is not None:
        rows = read_file(file)
        found = [
            SelfLabel(str(r["id"]), r["text"], r["label"]) for r in rows if has_strings(r, ("id", "text", "label"))
        ]
        if len(found) < len(rows):
            progress(f"[yellow]skipped {len(rows) - len(found)} self-label rows without a string id, text and label[/]")
        return found, str(file)
    conf = librdkafka_config(settings.kafka, "consumer")
    topics = settings.topics
    progress(f"reading {topics.output} and {topics.input} for the small path's own labels")
    outputs, reviews = selflabels.read(conf, topics.output, topics.input, timeout_s)
    found, counts = selflabels.join(outputs, reviews)
    progress(f"self-labels: {len(found)} ({counts})")
    return found, f"{topics.output}+{topics.input}@{settings.kafka.bootstrap_servers}"


def build_inputs(
    base: Path, records: list[Any], data_dir: Path | None, domains: list[str] | None, report_domains: list[str],
    *, progress: Progress, self_labels: list[SelfLabel] | None = None,
) -> Inputs:  # fmt: skip
    """The base model, its original train/test split (its own domains unless --domains says otherwise), the
    extra data it was trained with, the stream's self-labels, and the test split of each report domain."""
    origin = provenance(base)
    if domains:
        origin = dataclasses.replace(origin, domains=tuple(domains))
    rows = datasets.load_amazon(data_dir, list(origin.domains) if origin.domains else None)
    old_train, old_test = datasets.split_amazon(rows, origin.test_share, origin.split_seed)
    extra = {}
    for domain in report_domains:
        _train, test = datasets.split_amazon(
            datasets.load_amazon(data_dir, [domain]), origin.test_share, origin.split_seed
        )
        extra[domain] = test
    parsed, skipped = parse_records(records)
    if skipped:
        progress(f"[yellow]skipped {skipped} rows without a string id, text and llm_label[/]")
    return Inputs(
        base, parsed, old_train, old_test, origin, extra, self_labels or [], _extra_rows(data_dir, origin.uci_weight)
    )


def _extra_rows(data_dir: Path | None, weight: float) -> list[dict[str, Any]]:
    """The UCI sentences when the base model was trained with them (``shunt train --uci-weight``)."""
    return datasets.load_uci(data_dir) if weight > 0 else []


def train_config(base: Path, vocab_size: int, max_tokens: int) -> training.TrainConfig:
    """Training settings in the base model's feature space (its bigram buckets, from its config.json)."""
    config_path = base / "config.json"
    features = orjson.loads(config_path.read_bytes()).get("features", {}) if config_path.is_file() else {}
    return training.TrainConfig(
        vocab_size=vocab_size,
        buckets=int(features.get("buckets", training.TrainConfig().buckets)),  # the base model's feature space
        max_tokens=max_tokens,
        negation_window=int(features.get("negation_window", 0)),  # a base model without it had none
        # One model refitted on the whole mix, not the average of the fold models that `shunt train` ships:
        # a new domain's n-grams occur in few reviews, so each is missing from some folds' training and the
        # average shrinks exactly the weights L4S is there to learn (docs/l4s.md: shunt rate on a held-out
        # domain -24% relative with the average, -26% and -29% refitted, on two oracle seeds).
        final_model="refit",
        # C by calibrated log-loss, not accuracy: on the mix the grid's C are within 0.1-0.3 points of 5-fold
        # accuracy (a coin flip at this size) but their calibrated probabilities, which the router reads,
        # are not equally good (docs/l4s.md: shunt rate on the held-out domain -21..-25% chosen by accuracy,
        # -26..-31% by log-loss, the gate passed in each of three runs).
        select_c_by="nll",
    )
