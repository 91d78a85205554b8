"""JSONL reading and the stratified, reproducible split, on rows the tests generate themselves."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.offline import datasets
from consumer.offline.datasets import DatasetError
from tests.support.paths import ROOT


def make_rows(per_stratum: int = 50, domains: tuple[str, ...] = ("books", "dvd", "kitchen")) -> list[dict[str, Any]]:
    rows = []
    for domain in domains:
        for label in ("negative", "positive"):
            for i in range(per_stratum):
                rows.append(
                    {"id": f"{domain}-{label}-{i:04d}", "text": f"{label} words {i}", "label": label, "domain": domain}
                )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def test_load_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n\n  \n{"id": "b", "text": "y"}')
    assert [row["id"] for row in datasets.load_jsonl(path)] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"id": 1}\n{not json\n', "rows.jsonl:2: not valid JSON"),
        (b'{"id": 1}\n[1, 2]\n', "rows.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_load_jsonl_names_the_bad_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=expected):
        datasets.load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data file not found"):
        datasets.load_jsonl(tmp_path / "nope.jsonl")


def test_data_dir_from_env_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    assert datasets.data_dir() == tmp_path
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match="SHUNT_DATA_DIR"):
        datasets.data_dir()


def test_load_amazon_filters_domains(tmp_path: Path) -> None:
    write_jsonl(tmp_path / datasets.AMAZON_TRAIN, make_rows(3))
    rows = datasets.load_amazon(tmp_path, ["dvd"])
    assert {row["domain"] for row in rows} == {"dvd"} and len(rows) == 6
    with pytest.raises(DatasetError, match="unknown domain"):
        datasets.load_amazon(tmp_path, ["garden"])


def test_split_is_stratified_by_label_and_domain() -> None:
    rows = make_rows(50)
    train, test = datasets.split_amazon(rows, test_share=0.2, seed=7)
    assert len(test) == 60 and len(train) == 240
    assert set(Counter((r["label"], r["domain"]) for r in test).values()) == {10}
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in test)
    assert {r["id"] for r in train} | {r["id"] for r in test} == {r["id"] for r in rows}


def test_split_ignores_input_order_and_depends_on_seed() -> None:
    rows = make_rows(40)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    first = datasets.split_amazon(rows, seed=11)
    assert datasets.split_amazon(shuffled, seed=11) == first
    other = datasets.split_amazon(rows, seed=12)
    assert {r["id"] for r in other[1]} != {r["id"] for r in first[1]}


def test_split_of_a_domain_subset_keeps_its_test_rows() -> None:
    """The domain-shift experiment relies on this: filtering domains does not move rows across the split."""
    rows = make_rows(30)
    _, full_test = datasets.split_amazon(rows, seed=5)
    _, dvd_test = datasets.split_amazon([r for r in rows if r["domain"] == "dvd"], seed=5)
    assert dvd_test == [r for r in full_test if r["domain"] == "dvd"]


def test_split_rejects_duplicate_ids_and_bad_share() -> None:
    rows = make_rows(5)
    with pytest.raises(DatasetError, match="not unique"):
        datasets.split_amazon([*rows, rows[0]])
    with pytest.raises(ValueError, match="test_share"):
        datasets.split_amazon(rows, test_share=1.5)


def test_the_default_data_dir_is_beside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    # Moving datasets.py one folder deeper once pointed this inside the repository, silently.
    monkeypatch.delenv("SHUNT_DATA_DIR", raising=False)
    expected = ROOT.parent / "shared" / "data"
    if expected.is_dir():
        assert datasets.data_dir() == expected
    else:
        with pytest.raises(DatasetError, match=str(expected)):
            datasets.data_dir()
