"""What ``shunt distill`` distills: the records from the distill topic or a file, the base model's original
train/test split and the extra report domains, and the base model's feature space to train in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from consumer.config import Settings, librdkafka_config
from consumer.offline import datasets
from consumer.offline import train as training
from consumer.offline.distill.records import Provenance, parse_records, provenance, read_file, read_topic
from consumer.offline.distill.runner import Inputs
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


def build_inputs(
    base: Path, records: list[Any], data_dir: Path | None, domains: list[str] | None, report_domains: list[str],
    *, progress: Progress,
) -> Inputs:  # fmt: skip
    """The base model, its original train/test split (its own domains unless --domains says otherwise),
    and the test split of each report domain."""
    origin = provenance(base)
    if domains:
        origin = Provenance(tuple(domains), origin.split_seed, origin.test_share)
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
    return Inputs(base, parsed, old_train, old_test, origin, extra)


def train_config(base: Path, vocab_size: int, max_tokens: int) -> training.TrainConfig:
    """Training settings in the base model's feature space (its bigram buckets, from its config.json)."""
    config_path = base / "config.json"
    features = orjson.loads(config_path.read_bytes()).get("features", {}) if config_path.is_file() else {}
    return training.TrainConfig(
        vocab_size=vocab_size,
        buckets=int(features.get("buckets", training.TrainConfig().buckets)),  # the base model's feature space
        max_tokens=max_tokens,
        negation_window=int(features.get("negation_window", 0)),  # a base model without it had none
    )
