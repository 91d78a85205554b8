"""The batch lane's records and hook: a deferred.v1 record round-trips a scored review, batch keys parse back,
and the Deferrer takes reviews per lane (overflow only at the online pool's high-water mark)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME

from consumer.config import Settings
from consumer.errors import BadInputError
from consumer.records import Origin, Prediction, Review, Scored
from consumer.stream.deferral import NO_DEFERRAL, Deferrer, batch_key, deferred_record, parse_key, read_deferred
from tests.support.paths import ROOT

SCHEMA = orjson.loads((ROOT / "schemas" / "deferred.v1.json").read_bytes())


@dataclass
class FakeMessage:
    """The few accessors of confluent_kafka.Message that origin_of reads."""

    _value: bytes
    _headers: list[tuple[str, bytes]]

    def topic(self) -> str:
        return "reviews.deferred"

    def partition(self) -> int:
        return 1

    def offset(self) -> int:
        return 42

    def key(self) -> bytes:
        return b"r1"

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_CREATE_TIME, 1_700_000_000_500

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers


def scored() -> Scored:
    origin = Origin("reviews", 3, 7, key=b"\x00k", headers=(("trace", b"t1"),), timestamp_ms=1_700_000_000_000)
    review = Review("r1", "Half good, half bad.", origin, {"shop": 3})
    return Scored(review, Prediction("positive", 0.6, {"negative": 0.4, "positive": 0.6}, "m-1"))


def test_a_deferred_record_matches_its_schema_and_reads_back() -> None:
    record = deferred_record(scored(), 0.9, "inst-1", "batch")
    jsonschema.validate(record, SCHEMA)
    item = read_deferred(FakeMessage(orjson.dumps(record), [("trace", b"t1")]))  # type: ignore[arg-type]
    assert item.scored == scored()
    assert (item.position.topic, item.position.partition, item.position.offset) == ("reviews.deferred", 1, 42)
    assert item.custom_id == "reviews.deferred:1:42"


@pytest.mark.parametrize("value", [b"not json", b"{}", orjson.dumps({"id": "x", "text": "t", "small": {}})])
def test_a_record_that_is_not_deferred_v1_is_bad_input(value: bytes) -> None:
    with pytest.raises(BadInputError) as info:
        read_deferred(FakeMessage(value, []))  # type: ignore[arg-type]
    assert info.value.reason == "invalid_deferred"


def test_batch_keys_name_one_partition_run_and_parse_back() -> None:
    key = batch_key(("reviews.deferred", 2), 100, 199)
    assert key == "shunt:reviews.deferred:2:100-199"
    assert parse_key(key) == (("reviews.deferred", 2), 100, 199)
    assert parse_key("someone else's batch") is None and parse_key("shunt:t:x:1-2") is None


def deferrer(lane: str, **llm: Any) -> Deferrer:
    settings = Settings(llm={"lane": lane, "queue_high_water": 10, "queue_low_water": 5} | llm)
    return Deferrer(settings, sink=None)  # type: ignore[arg-type]


def test_each_lane_takes_what_it_should() -> None:
    batch, overflow = deferrer("batch"), deferrer("overflow")
    assert batch.takes(0) and batch.takes(10_000)
    assert not overflow.takes(9) and overflow.takes(10)
    assert not NO_DEFERRAL.takes(10_000)
    # overflow defers instead of pausing: the pipeline's pause no longer sees the online backlog
    assert overflow.pausing_backlog(50) == 0 and batch.pausing_backlog(50) == 50 == NO_DEFERRAL.pausing_backlog(50)
