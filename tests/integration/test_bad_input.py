"""Bad input never stops the service and never vanishes (property-based, against the running service).

One service runs for the whole module; each hypothesis example produces a batch of malformed messages mixed
with good ones and checks that every bad one reached the DLQ with the expected reason and its original bytes,
and every good one was labeled, and that the service is still running.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import contracts
from tests.support import kafka
from tests.support.service import Collector, Process, start_service, start_standin

pytestmark = pytest.mark.kafka
MAX_TEXT = 2_000


@dataclass(frozen=True)
class Case:
    value: bytes | None
    reason: str | None  # None: a good review, to be labeled

    def with_id(self) -> tuple[bytes | None, str | None]:
        """Good cases get a fresh id here, so every example's ids are unique."""
        if self.reason is not None or self.value is None:
            return self.value, None
        review_id = f"good-{uuid.uuid4().hex}"
        return orjson.dumps(orjson.loads(self.value) | {"id": review_id}), review_id


ints = st.integers(-(2**63), 2**63 - 1)  # orjson's range
texts = st.text(min_size=1, max_size=300).filter(lambda t: t.strip() != "")
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
good = st.builds(
    lambda text, meta: Case(orjson.dumps({"id": "x", "text": text} | {f"m_{k}": v for k, v in meta.items()}), None),
    texts,
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
bad = st.one_of(
    st.just(Case(None, "null_value")),
    st.binary(max_size=50).map(lambda b: Case(b"\xff\xfe" + b, "invalid_utf8")),
    st.text(max_size=50).map(lambda t: Case(("{oops " + t).encode(), "invalid_json")),
    st.lists(json_values, max_size=4).map(lambda v: Case(orjson.dumps(v), "not_an_object")),
    st.one_of(ints, st.text(max_size=10)).map(lambda v: Case(orjson.dumps(v), "not_an_object")),
    texts.map(lambda t: Case(orjson.dumps({"text": t}), "schema_violation")),
    ints.map(lambda i: Case(orjson.dumps({"id": i, "text": "fine"}), "schema_violation")),
    json_values.filter(lambda v: not isinstance(v, str)).map(
        lambda v: Case(orjson.dumps({"id": "x", "text": v}), "schema_violation")
    ),
    st.sampled_from(["", " ", "\n\t ", "\u00a0"]).map(
        lambda t: Case(orjson.dumps({"id": "x", "text": t}), "empty_text")
    ),
    st.integers(MAX_TEXT + 1, MAX_TEXT * 3).map(
        lambda n: Case(orjson.dumps({"id": "x", "text": "a" * n}), "text_too_long")
    ),
)
batches = st.lists(st.one_of(good, bad, bad), min_size=40, max_size=120)


@dataclass
class Harness:
    input: str
    output: Collector
    dlq: Collector
    service: Process
    producer: Producer


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, kafka_admin: AdminClient) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("bad-input")
    topics = kafka.Topics(kafka_admin)
    names = {n: topics.make(n, partitions=2 if n == "in" else 1) for n in ("in", "out", "dlq", "distill", "metrics")}
    llm, url = start_standin(tmp / "standin.log", "--latency-ms", "1-3")
    service = start_service(
        tmp / "service.log", topics__input=names["in"], topics__output=names["out"], topics__dlq=names["dlq"],
        topics__distill=names["distill"], topics__metrics=names["metrics"], kafka__group_id=kafka.unique("g"),
        llm__base_url=url, service__max_text_bytes=MAX_TEXT, llm__rpm=1_000_000, llm__tpm=1_000_000_000,
    )  # fmt: skip
    producer = Producer({"bootstrap.servers": kafka.bootstrap(), "linger.ms": 5})
    harness = Harness(names["in"], Collector(names["out"]), Collector(names["dlq"]), service, producer)
    yield harness
    harness.output.close()
    harness.dlq.close()
    service.kill()
    llm.kill()
    topics.cleanup()


def produce_batch(h: Harness, cases: list[Case]) -> tuple[set[str], dict[tuple[int, int], Case]]:
    """Produce; returns the good ids and the bad cases by (partition, offset)."""
    good_ids: set[str] = set()
    bad_at: dict[tuple[int, int], Case] = {}

    def delivered(case: Case) -> Any:
        def report(err: Any, msg: Any) -> None:
            assert err is None, err
            if case.reason is not None:
                bad_at[(msg.partition(), msg.offset())] = case

        return report

    for case in cases:
        value, review_id = case.with_id()
        if review_id is not None:
            good_ids.add(review_id)
        h.producer.produce(h.input, value=value, headers=[("trace", b"t-1")], on_delivery=delivered(case))
    assert h.producer.flush(30) == 0
    return good_ids, bad_at


def dlq_index(h: Harness) -> dict[tuple[int, int], dict[str, Any]]:
    return {(d["input"]["partition"], d["input"]["offset"]): d for d in h.dlq.values}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases=batches)
def test_every_bad_message_is_dead_lettered_and_every_good_one_labeled(harness: Harness, cases: list[Case]) -> None:
    good_ids, bad_at = produce_batch(harness, cases)
    deadline = time.monotonic() + 60
    while not (good_ids <= set(harness.output.ids()) and set(bad_at) <= set(dlq_index(harness))):
        assert harness.service.proc.poll() is None, harness.service.log()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the batch's outputs"
        harness.output.poll(0.1)
        harness.dlq.poll(0.1)
    dead = dlq_index(harness)
    for position, case in bad_at.items():
        letter = dead[position]
        contracts.validate("dlq", letter)
        assert letter["reason"] == case.reason, (letter["reason"], case.reason, letter["detail"])
        original = None if letter["original_b64"] is None else base64.b64decode(letter["original_b64"])
        assert original == case.value
        assert letter["headers"] == [{"key": "trace", "value_b64": base64.b64encode(b"t-1").decode()}]
    assert harness.service.proc.poll() is None


def test_the_service_survived_everything(harness: Harness, report: Callable[[str], None]) -> None:
    assert harness.service.proc.poll() is None
    for value in harness.output.values:
        contracts.validate("labeled", value)
    reasons = Counter(d["reason"] for d in harness.dlq.values)
    report(f"bad input: {sum(reasons.values())} dead letters {dict(reasons)}, {len(harness.output.values)} labeled")
