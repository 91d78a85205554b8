"""Dead letters that always fit: cut to the room the DLQ topic gives, with the full size and sha256 kept."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer import contracts
from consumer.errors import BadInputError
from consumer.kafka.message import DamagedOrigin
from consumer.kafka.sink import FRAMING_BYTES, Outgoing, record_size
from consumer.records import Origin
from consumer.stream import outputs
from consumer.stream.decoding import decode

ORIGIN = Origin("reviews", 2, 41, key=b"k-1", headers=(("trace", b"t-1"),))


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def letter_for(value: bytes | None, origin: Origin = ORIGIN, reason: str = "text_too_long") -> dict[str, Any]:
    return outputs.dlq(reason, "too long", origin, value, "i-1")


def check_fitted(fitted: dict[str, Any], room: int, value: bytes | None, origin: Origin) -> None:
    contracts.validate("dlq", fitted)
    assert len(contracts.dumps(fitted)) <= room
    assert fitted["truncated"] is True
    if value is None:
        assert fitted["original_b64"] is None
    else:
        assert value.startswith(unb64(fitted["original_b64"]) or b"")
        assert fitted["original_size"] == len(value)
        assert fitted["original_sha256"] == hashlib.sha256(value).hexdigest()
    if origin.key is not None:
        assert origin.key.startswith(unb64(fitted["key_b64"]) or b"")
        assert fitted["key_size"] == len(origin.key)
    assert fitted["headers_count"] == len(origin.headers)
    kept = [(h["key"], unb64(h["value_b64"])) for h in fitted["headers"]]
    assert kept == list(origin.headers[: len(kept)])


def test_a_30_kb_original_fits_a_20000_byte_topic() -> None:
    value = orjson.dumps({"id": "x", "text": "a" * 30_000})
    fitted = outputs.fit(letter_for(value), 20_000 - FRAMING_BYTES)
    check_fitted(fitted, 20_000 - FRAMING_BYTES, value, ORIGIN)
    assert len(unb64(fitted["original_b64"]) or b"") > 10_000  # most of the room holds the original


def test_a_2_mb_value_a_huge_key_and_thousands_of_headers_fit_the_producer_limit() -> None:
    headers = (*((f"h{i}", b"v" * 300) for i in range(3000)), ("big", b"\x00" * 400_000))
    origin = Origin("reviews", 0, 7, key=b"\xff" * 300_000, headers=headers)
    value = bytes(range(256)) * 8192
    room = 1_000_000 - FRAMING_BYTES
    fitted = outputs.fit(letter_for(value, origin), room)
    check_fitted(fitted, room, value, origin)
    assert 0 < len(fitted["headers"]) < 3001
    assert fitted["key_sha256"] == hashlib.sha256(origin.key or b"").hexdigest()


@settings(max_examples=60, deadline=None)
@given(
    value=st.one_of(st.none(), st.binary(max_size=40_000)),
    key=st.one_of(st.none(), st.binary(max_size=20_000)),
    headers=st.lists(st.tuples(st.text(max_size=30), st.binary(max_size=3_000)), max_size=40),
    room=st.integers(6_000, 60_000),
)
def test_any_letter_fits_any_room(value: bytes | None, key: bytes | None, headers: list[Any], room: int) -> None:
    origin = Origin("reviews", 0, 3, key=key, headers=tuple(headers))
    fitted = outputs.fit(letter_for(value, origin), room)
    check_fitted(fitted, room, value, origin)


def test_a_damaged_origin_becomes_an_invalid_header_letter_with_the_raw_key() -> None:
    origin = DamagedOrigin("reviews", 0, 9, key=b"\xfe", problem="a header key is not UTF-8", raw_header_key=b"\xff=")
    with pytest.raises(BadInputError) as info:
        decode(b'{"id": "a", "text": "fine"}', origin, 1000)
    assert info.value.reason == "invalid_header"
    letter = outputs.dlq(info.value.reason, info.value.detail, origin, b"v", "i-1")
    contracts.validate("dlq", letter)
    assert letter["headers_incomplete"] is True
    assert unb64(letter["invalid_header_key_b64"]) == b"\xff="
    fitted = outputs.fit(letter | {"invalid_header_key_b64": base64.b64encode(b"\xff" * 50_000).decode()}, 8_000)
    assert len(contracts.dumps(fitted)) <= 8_000
    assert (unb64(fitted["invalid_header_key_b64"]) or b"x").strip(b"\xff") == b""


RESCUE = outputs.DeadLetters("dlq", "i-1")


def test_a_dead_letter_too_large_is_cut_and_a_long_key_replaced_by_its_hash() -> None:
    key = b"k" * 5000
    value = contracts.dumps(letter_for(b"z" * 50_000, Origin("reviews", 0, 1, key=key)))
    replacement = RESCUE(Outgoing("dlq", key, value, ORIGIN.headers), "MSG_SIZE_TOO_LARGE: big", 19_000)
    assert replacement is not None
    assert replacement.key == hashlib.sha256(key).hexdigest().encode()
    assert replacement.headers == ()
    assert record_size(replacement) <= 19_000 + FRAMING_BYTES
    fitted = orjson.loads(replacement.value)
    assert (fitted["reason"], fitted["truncated"], fitted["original_size"]) == ("text_too_long", True, 50_000)


def test_a_refused_labeled_output_becomes_an_output_refused_letter_at_its_input_position() -> None:
    labeled = orjson.dumps({"schema_version": "labeled.v1", "id": "r-9", "input": outputs.position(ORIGIN)})
    replacement = RESCUE(Outgoing("out", "r-9", labeled, ()), "INVALID_RECORD: compacted", 50_000)
    assert replacement is not None
    letter = orjson.loads(replacement.value)
    contracts.validate("dlq", letter)
    assert (letter["reason"], letter["review_id"], letter["input"]) == (
        "output_refused",
        "r-9",
        outputs.position(ORIGIN),
    )
    assert unb64(letter["original_b64"]) == labeled
    assert "out refused it: INVALID_RECORD" in letter["detail"]


def test_an_output_with_no_position_has_no_dead_letter_unless_it_names_its_origin() -> None:
    distill = orjson.dumps({"schema_version": "distill.v1", "id": "r-1"})
    assert RESCUE(Outgoing("distill", "r-1", distill), "MSG_SIZE_TOO_LARGE", 50_000) is None
    replacement = RESCUE(Outgoing("distill", "r-1", distill, origin=ORIGIN), "MSG_SIZE_TOO_LARGE", 50_000)
    assert replacement is not None
    assert orjson.loads(replacement.value)["input"] == outputs.position(ORIGIN)
