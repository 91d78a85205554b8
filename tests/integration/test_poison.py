"""Poison never stops the service: any bytes anywhere in a message end labeled or dead-lettered (issue 14).

Each scenario runs the real service as a subprocess that stops by itself (``--max-messages``) and must exit 0
with its group's committed offsets at the end of the input. Messages are written with raw bytes, by
confluent's producer and by kcat (which can write header keys that are not UTF-8).
"""

from __future__ import annotations

import base64
import hashlib
import random
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from consumer import contracts
from consumer.kafka.admin import TopicSpec
from tests.support import kafka
from tests.support.service import Process, start_service, start_standin

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (.ci/run installs it)"),
]
MAX_TEXT = 2_000
TOO_LONG = MAX_TEXT * 2 + 4096  # longer values are text_too_long before they are parsed
INPUT_MAX_BYTES = 3_000_000


@dataclass
class Case:
    value: bytes | None
    review_id: str | None  # set for a good review, to be labeled
    reason: str | None = None  # set for a bad one: the dead letter's reason
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    def __repr__(self) -> str:  # short: hypothesis prints the examples it ran
        return f"Case({self.reason or self.review_id}, value={_size(self.value)}, key={_size(self.key)}, " + (
            f"headers={len(self.headers)}/{sum(len(v) for _, v in self.headers)} B)"
        )


@dataclass
class KcatCase:
    value: bytes
    review_id: str | None
    headers: list[bytes]  # b"key=value" arguments; keys may be any bytes but NUL and "="
    key: bytes
    reason: str | None

    def __repr__(self) -> str:
        return f"KcatCase({self.reason or self.review_id}, value={len(self.value)}, headers={self.headers!r})"


def _size(raw: bytes | None) -> str:
    return "None" if raw is None else f"{len(raw)} B"


def good_value(text: str) -> tuple[bytes, str]:
    review_id = f"good-{uuid.uuid4().hex}"
    return orjson.dumps({"id": review_id, "text": text}), review_id


def blob(low: int, high: int) -> st.SearchStrategy[bytes]:
    """Any bytes, ``low`` to ``high`` of them: hypothesis draws the size and a seed (its buffer stays small)."""
    return st.builds(lambda n, seed: random.Random(seed).randbytes(n), st.integers(low, high), st.integers(0, 2**32))


texts = st.text(min_size=1, max_size=60).filter(lambda t: t.strip() != "")
keys = st.one_of(st.none(), st.binary(max_size=16), blob(1_000, 20_000))
small_headers = st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=16)), max_size=3)
many_headers = st.integers(1_000, 3_000).map(lambda n: [(f"h-{i}", b"%d" % i) for i in range(n)])
huge_headers = st.integers(300_000, 450_000).map(lambda n: [("big-1", b"a" * n), ("big-2", b"b" * n), ("x", b"")])
headers = st.one_of(small_headers, small_headers, small_headers, many_headers, huge_headers)
good = st.builds(lambda t, k, h: Case(*good_value(t), key=k, headers=h), texts, keys, headers)
bad = st.one_of(
    st.builds(lambda k, h: Case(None, None, "null_value", k, h), keys, small_headers),
    st.builds(lambda b, k, h: Case(b"\xff" + b, None, "invalid_utf8", k, h), blob(0, 4_000), keys, headers),
    st.builds(lambda t, k: Case(("{oops " + t).encode(), None, "invalid_json", k), st.text(max_size=30), keys),
    st.builds(lambda t: Case(orjson.dumps({"text": t}), None, "schema_violation"), texts),
)
big = st.builds(
    lambda v, k, h: Case(v, None, "text_too_long", k, h), blob(TOO_LONG + 1, 2_000_000), keys, small_headers
)
bad_key = st.binary(min_size=1, max_size=40).filter(lambda b: b"\x00" not in b and b"=" not in b)
kcat_bad = st.builds(
    lambda k, key, t: KcatCase(good_value(t)[0], None, [b"ok=1", b"\xff" + k + b"=v", b"x=2"], key, "invalid_header"),
    bad_key,
    bad_key,
    texts,
)
kcat_good = st.builds(
    lambda t, key: KcatCase(*good_value(t), ["ключ".encode() + b"=\xff\xfe", b"nullvalue"], key, None),
    texts,
    bad_key,
)


class Batch:
    """One example: a plain class, so hypothesis prints this short summary, not megabytes of bytes."""

    def __init__(self, cases: list[Case], kcats: list[KcatCase]) -> None:
        self.cases, self.kcats = cases, kcats

    def __repr__(self) -> str:
        return f"Batch({self.cases!r}, {self.kcats!r})"


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    cases = draw(st.lists(good, min_size=100, max_size=200)) + draw(st.lists(bad, min_size=50, max_size=120))
    cases += draw(st.lists(big, min_size=1, max_size=3))
    draw(st.randoms()).shuffle(cases)
    kcats = draw(st.lists(st.one_of(kcat_bad, kcat_good), min_size=2, max_size=10))
    return Batch(cases, kcats)


# -- running one scenario --------------------------------------------------------------------------------
@dataclass
class Run:
    names: dict[str, str]
    group: str
    code: int
    log: str


def make_topics(topics: kafka.Topics, **configs: dict[str, str]) -> dict[str, str]:
    admin = kafka.topic_admin()
    names: dict[str, str] = {}
    for role in ("in", "out", "dlq", "distill", "metrics"):
        name = kafka.unique(role)
        admin.create([TopicSpec(name, 2 if role == "in" else 1, config=configs.get(role, {}))])
        topics.created.append(name)
        names[role] = name
    return names


def run_service(tmp: Path, names: dict[str, str], url: str, count: int, **extra: Any) -> Run:
    group = kafka.unique("g")
    proc: Process = start_service(
        tmp / f"service-{group}.log", "--max-messages", str(count),
        topics__input=names["in"], topics__output=names["out"], topics__dlq=names["dlq"],
        topics__distill=names["distill"], topics__metrics=names["metrics"], kafka__group_id=group,
        llm__base_url=url, llm__rpm=1_000_000, llm__tpm=1_000_000_000, **extra,
    )  # fmt: skip
    try:
        code = proc.wait(120)
    finally:
        proc.kill()
    return Run(names, group, code, proc.log())


def assert_committed_at_end(run: Run, ends: dict[int, int]) -> None:
    # An empty partition has nothing committed (OFFSET_INVALID): count it as at its end, 0.
    committed = {p: max(o, 0) for p, o in kafka.committed(run.group, run.names["in"], 2).items()}
    assert committed == ends, (committed, ends, run.log[-3000:])


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def check_copy(letter: dict[str, Any], value: bytes | None, key: bytes | None) -> bool:
    """The dead letter keeps the original bytes, whole or (when it had to be cut) a prefix with size and sha256."""
    original = unb64(letter["original_b64"])
    if not letter.get("truncated"):
        assert (original, unb64(letter["key_b64"])) == (value, key)
        return False
    assert value is not None and original is not None and value.startswith(original)
    assert (letter["original_size"], letter["original_sha256"]) == (len(value), hashlib.sha256(value).hexdigest())
    return True


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_standin(tmp_path_factory.mktemp("standin") / "standin.log", "--latency-ms", "1-3")
    yield url
    proc.kill()


# -- the property ------------------------------------------------------------------------------------------
def produce(topic: str, cases: list[Case]) -> dict[tuple[int, int], Case]:
    producer = Producer(
        {"bootstrap.servers": kafka.bootstrap(), "linger.ms": 5, "message.max.bytes": INPUT_MAX_BYTES + 100_000}
    )
    at: dict[tuple[int, int], Case] = {}

    def report(case: Case) -> Callable[[Any, Any], None]:
        def delivered(err: Any, msg: Any) -> None:
            assert err is None, err
            at[(msg.partition(), msg.offset())] = case

        return delivered

    for case in cases:
        producer.produce(topic, case.value, case.key, 0, headers=list[Any](case.headers), on_delivery=report(case))
        producer.poll(0)
    assert producer.flush(60) == 0
    return at


def kcat(topic: str, tmp: Path, cases: list[KcatCase]) -> dict[tuple[int, int], KcatCase]:
    """Each case as one message on partition 1, in order (kcat sends a file as one message)."""
    at: dict[tuple[int, int], KcatCase] = {}
    for offset, case in enumerate(cases):
        path = tmp / f"kcat-{uuid.uuid4().hex}"
        path.write_bytes(case.value)
        args = [b"kcat", b"-b", kafka.bootstrap().encode(), b"-P", b"-t", topic.encode(), b"-p", b"1"]
        args += [b"-k", case.key, *(part for header in case.headers for part in (b"-H", header)), bytes(path)]
        subprocess.run(args, check=True, timeout=30, capture_output=True)
        at[(1, offset)] = case
    return at


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is a service run; the report says enough
)
@given(batch=batches())
def test_any_bytes_anywhere_end_labeled_or_dead_lettered(
    batch: Batch,
    topics: kafka.Topics,
    tmp_path: Path,
    standin: str,
    report: Callable[[str], None],
) -> None:
    cases, kcats = batch.cases, batch.kcats
    names = make_topics(topics, **{"in": {"max.message.bytes": str(INPUT_MAX_BYTES)}})
    produced = produce(names["in"], cases)
    typed = kcat(names["in"], tmp_path, kcats)
    run = run_service(tmp_path, names, standin, len(cases) + len(kcats), service__max_text_bytes=MAX_TEXT)
    assert run.code == 0, run.log[-4000:]
    assert_committed_at_end(run, {0: len(cases), 1: len(kcats)})
    every: dict[tuple[int, int], Case | KcatCase] = {**produced, **typed}
    good_ids = {c.review_id for c in every.values() if c.reason is None}
    bad = {at: c for at, c in every.items() if c.reason is not None}
    labeled = kafka.read_json(names["out"], len(good_ids), 60)
    letters = {(d["input"]["partition"], d["input"]["offset"]): d for d in kafka.read_json(names["dlq"], len(bad), 60)}
    assert good_ids <= {r["id"] for r in labeled}
    truncated = 0
    for at, case in bad.items():
        letter = letters[at]
        contracts.validate("dlq", letter)
        assert letter["reason"] == case.reason, (letter["reason"], case.reason, letter["detail"])
        if isinstance(case, KcatCase):
            assert letter["headers_incomplete"] is True
            assert unb64(letter["invalid_header_key_b64"]) == case.headers[1].split(b"=")[0]
            assert unb64(letter["original_b64"]) == case.value
        else:
            truncated += check_copy(letter, case.value, case.key)
            assert len(case.value or b"") < 700_000 or letter["truncated"]
    reasons = Counter(c.reason for c in bad.values())
    dropped, cut = run.log.count('"headers_dropped"'), run.log.count('"refused_dead_lettered"')
    report(
        f"poison: {len(every)} messages ({len(kcats)} by kcat), {len(good_ids)} labeled, {len(bad)} dead letters "
        f"({truncated} truncated; sink: {dropped} header sets dropped, {cut} records cut to fit) {dict(reasons)}, "
        f"exit {run.code}"
    )


# -- dead letters that must be cut to fit ------------------------------------------------------------------
def test_a_30_kb_bad_message_fits_a_dlq_of_20000_bytes(
    topics: kafka.Topics, tmp_path: Path, standin: str, report: Callable[[str], None]
) -> None:
    names = make_topics(topics, dlq={"max.message.bytes": "20000"})
    poison = b"\xff" + random.Random(1).randbytes(30_000)  # invalid_utf8, and incompressible
    values = [orjson.dumps({"id": f"r-{i}", "text": "fine, thanks"}) for i in range(20)]
    kafka.produce(names["in"], [*values[:10], poison, *values[10:]], partition=0)
    run = run_service(tmp_path, names, standin, 21)
    assert run.code == 0, run.log[-4000:]
    assert_committed_at_end(run, {0: 21, 1: 0})
    (letter,) = kafka.read_json(names["dlq"], 1)
    assert (letter["reason"], letter["input"]["offset"], letter["truncated"]) == ("invalid_utf8", 10, True)
    assert check_copy(letter, poison, None)
    assert len(kafka.read_json(names["out"], 20)) >= 20
    report(f"30 KB poison into a 20000-byte DLQ: truncated to {len(unb64(letter['original_b64']) or b'')} bytes")


def test_an_800_kb_review_is_dead_lettered_as_text_too_long_and_fits(
    topics: kafka.Topics, tmp_path: Path, standin: str, report: Callable[[str], None]
) -> None:
    names = make_topics(topics)
    review = orjson.dumps({"id": "huge", "text": "great product " * 57000})
    kafka.produce(names["in"], [review, orjson.dumps({"id": "small", "text": "fine"})], partition=0)
    run = run_service(tmp_path, names, standin, 2)
    assert run.code == 0, run.log[-4000:]
    assert_committed_at_end(run, {0: 2, 1: 0})
    (letter,) = kafka.read_json(names["dlq"], 1)
    assert (letter["reason"], letter["truncated"]) == ("text_too_long", True)
    assert check_copy(letter, review, None)
    assert [r["id"] for r in kafka.read_json(names["out"], 1)] == ["small"]
    report(f"800 KB review: text_too_long, {len(review)} bytes kept as a {len(letter['original_b64'])}-char prefix")


def test_a_distill_record_too_big_for_its_topic_is_dead_lettered_not_fatal(
    topics: kafka.Topics, tmp_path: Path, standin: str, report: Callable[[str], None]
) -> None:
    names = make_topics(topics, distill={"max.message.bytes": "1500"})
    text = "solid kettle, boils fast, no leaks so far. " * 40  # ~1.7 KB: the review fits, its distill record not
    kafka.produce(names["in"], [orjson.dumps({"id": "long", "text": text})], partition=0)
    run = run_service(tmp_path, names, standin, 1, router__threshold=1.0)  # every review goes to the LLM
    assert run.code == 0, run.log[-4000:]
    assert_committed_at_end(run, {0: 1, 1: 0})
    (labeled,) = kafka.read_json(names["out"], 1)
    (letter,) = kafka.read_json(names["dlq"], 1)
    assert (labeled["id"], labeled["source"]) == ("long", "large")
    assert (letter["reason"], letter["input"]["offset"]) == ("output_refused", 0)
    report(f"distill record over a 1500-byte topic: dead-lettered as {letter['reason']}, exit 0")
