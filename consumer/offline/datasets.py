"""Labelled review data for training and evaluation: JSONL reading and a reproducible, stratified split.

The data are third-party and never copied into the repository; they are read from ``SHUNT_DATA_DIR``
(default ``<repo>/../shared/data``) at training or benchmark time.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from consumer.errors import ShuntError

DATA_DIR_ENV = "SHUNT_DATA_DIR"
AMAZON_TRAIN = "amazon-reviews-train.jsonl"
UCI_SENTENCES = "uci-sentences.jsonl"
DEFAULT_SPLIT_SEED = 20070625  # the ACL 2007 conference date; any fixed number would do
_REPO = Path(__file__).resolve().parents[2]  # consumer/offline/datasets.py -> the repository


class DatasetError(ShuntError):
    """A data file or folder is missing or malformed; the message names the file and the line."""


def data_dir(override: Path | None = None) -> Path:
    """The shared data folder: ``override``, else env ``SHUNT_DATA_DIR``, else ``<repo>/../shared/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    path = override or (Path(env) if env else _REPO.parent / "shared" / "data")
    if not path.is_dir():
        raise DatasetError(
            f"data folder {path} does not exist; set {DATA_DIR_ENV} or pass --data-dir to where {AMAZON_TRAIN} lives"
        )
    return path


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read one JSON object per line; blank lines are skipped, anything else that is not an object fails."""
    return [row for _number, row in iter_jsonl(path)]


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream (line number, object) pairs, for files too large to hold; errors name the file and line."""
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, _parse_line(path, number, line)
    except FileNotFoundError:
        raise DatasetError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DatasetError(f"expected a JSONL file, got a folder: {path}") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from None


def _parse_line(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{number}: not valid JSON ({exc})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return row


def load_amazon(directory: Path | None = None, domains: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The Amazon multi-domain reviews (Blitzer et al., 2007), optionally only some ``domains``."""
    rows = load_jsonl(data_dir(directory) / AMAZON_TRAIN)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise DatasetError(f"{AMAZON_TRAIN} row {number}: needs string fields 'text' and 'label'")
    if domains:
        known = {str(row.get("domain")) for row in rows}
        unknown = sorted(set(domains) - known)
        if unknown:
            raise DatasetError(f"unknown domain(s) {unknown}; the data have {sorted(known)}")
        rows = [row for row in rows if row.get("domain") in domains]
    return rows


def load_uci(directory: Path | None = None) -> list[dict[str, Any]]:
    """The UCI labelled sentences (Kotzias et al., KDD 2015): extra training data, never test data."""
    rows = load_jsonl(data_dir(directory) / UCI_SENTENCES)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise DatasetError(f"{UCI_SENTENCES} row {number}: needs string fields 'text' and 'label'")
    return rows


def split_amazon(
    rows: Sequence[dict[str, Any]], test_share: float = 0.2, seed: int = DEFAULT_SPLIT_SEED
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split into (train, test), stratified by (label, domain), the same on every machine.

    Rows are ordered by id, then shuffled by a keyed hash of (seed, id) rather than a library RNG, whose
    streams may change between versions; the input's file order never matters. Each stratum gives
    ``round(size * test_share)`` rows to the test side.
    """
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must be between 0 and 1, got {test_share}")
    strata: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(rows, key=_row_id):
        strata[(str(row.get("label")), str(row.get("domain", "")))].append(row)
    _check_unique_ids(rows)
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for key in sorted(strata):
        members = sorted(strata[key], key=lambda row: _shuffle_key(seed, _row_id(row)))
        cut = round(len(members) * test_share)
        test.extend(members[:cut])
        train.extend(members[cut:])
    return sorted(train, key=_row_id), sorted(test, key=_row_id)


def _row_id(row: dict[str, Any]) -> str:
    if "id" not in row:
        raise DatasetError("every row needs an 'id' for a reproducible split")
    return str(row["id"])


def _check_unique_ids(rows: Sequence[dict[str, Any]]) -> None:
    ids = [_row_id(row) for row in rows]
    if len(set(ids)) != len(ids):
        raise DatasetError("row ids are not unique; a reproducible split needs unique ids")


def _shuffle_key(seed: int, row_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=16).digest()
