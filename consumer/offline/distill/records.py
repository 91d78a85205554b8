"""Distill records (``distill.v1``) read from the topic or a file, parsed leniently, de-duplicated and split
by a keyed hash of the id; and the base model's provenance: which original data and split it came from."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from consumer.errors import ShuntError
from consumer.kafka.reader import TopicReadError, read_topics
from consumer.offline import datasets

Row = Mapping[str, Any]


class DistillError(ShuntError):
    """Distillation cannot run: no usable records, an unreadable topic, a folder that would be clobbered."""


@dataclass(frozen=True, slots=True)
class DistillRecord:
    """One LLM answer kept for training (the fields of ``distill.v1`` that distillation uses)."""

    id: str
    text: str
    llm_label: str
    model_version: str = ""


def parse_records(rows: Iterable[Any]) -> tuple[list[DistillRecord], int]:
    """Usable records and how many rows were skipped (not an object, or no string id/text/llm_label).

    Lenient on purpose: a hand-written file needs only ``id``, ``text`` and ``llm_label``; one bad message
    on a long-lived topic must not block every future retraining.
    """
    records: list[DistillRecord] = []
    skipped = 0
    for row in rows:
        if not has_strings(row, ("id", "text", "llm_label")):
            skipped += 1
            continue
        version = row.get("model_version")
        records.append(DistillRecord(row["id"], row["text"], row["llm_label"], str(version or "")))
    return records, skipped


def has_strings(row: Any, keys: Sequence[str]) -> bool:
    """Whether ``row`` is an object with a non-empty string under every one of ``keys``."""
    return isinstance(row, dict) and all(isinstance(row.get(key), str) and row[key] for key in keys)


def dedupe(records: Sequence[DistillRecord]) -> list[DistillRecord]:
    """One record per review id, the last one read: at-least-once delivery may repeat an answer."""
    return list({record.id: record for record in records}.values())


def holdout_side(record_id: str, share: float, seed: int) -> bool:
    """Whether a record is held out: a keyed hash of its id, so a record keeps its side as the topic grows
    and a later retraining never trains on what an earlier one held out."""
    digest = hashlib.blake2b(f"{seed}:{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def split_holdout(
    records: Sequence[DistillRecord], share: float, seed: int
) -> tuple[list[DistillRecord], list[DistillRecord]]:
    """(train, held out) by :func:`holdout_side`."""
    train: list[DistillRecord] = []
    held: list[DistillRecord] = []
    for record in records:
        (held if holdout_side(record.id, share, seed) else train).append(record)
    return train, held


def read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file of distill records (errors name the file and line)."""
    return datasets.load_jsonl(path)


def read_topic(conf: Mapping[str, Any], topic: str, timeout_s: float = 120.0) -> list[Any]:
    """Every message of ``topic`` from the beginning to the high watermarks seen at the start, decoded
    (None for a value that is not JSON). Reads without a group: nothing is committed, nobody rebalances."""
    try:
        return [decode(m.value) for m in read_topics(conf, [topic], timeout_s)]
    except TopicReadError as exc:
        raise DistillError(f"cannot read the distill topic: {exc}") from None


def decode(value: bytes | None) -> Any:
    """A message value as JSON; None for no value or one that is not JSON."""
    try:
        return orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class Provenance:
    """Which original data a model was trained on: the domains, the split that held its test set out, and
    the weight of the extra UCI sentences."""

    domains: tuple[str, ...] | None = None
    split_seed: int = datasets.DEFAULT_SPLIT_SEED
    test_share: float = 0.2
    uci_weight: float = 0.0  # the UCI sentences' weight in every fit (0: not used)

    def as_json(self) -> dict[str, Any]:
        return {"domains": list(self.domains) if self.domains else None, "split_seed": self.split_seed,
                "test_share": self.test_share, "uci_weight": self.uci_weight}  # fmt: skip


def provenance(model: Path) -> Provenance:
    """From config.json ``training_data`` (written by distill), else metrics.json ``options`` (by train)."""
    for name, key, seed_key in (("config.json", "training_data", "split_seed"), ("metrics.json", "options", "seed")):
        path = model / name
        document = orjson.loads(path.read_bytes()) if path.is_file() else {}
        found = document.get(key) if isinstance(document, dict) else None
        if isinstance(found, dict):
            domains = found.get("domains")
            return Provenance(
                tuple(domains) if domains else None,
                int(found.get(seed_key, datasets.DEFAULT_SPLIT_SEED)),
                float(found.get("test_share", 0.2)),
                float(found.get("uci_weight", 0.0)),
            )
    return Provenance()


@dataclass(frozen=True, slots=True)
class EvalSet:
    """Texts with the label to score against; ``gate`` marks the set a candidate must not be worse on."""

    name: str
    texts: list[str]
    truth: list[str]
    gate: bool = False


def eval_set(name: str, rows: Sequence[Row], gate: bool = False) -> EvalSet:
    return EvalSet(name, [str(r["text"]) for r in rows], [str(r["label"]) for r in rows], gate)
