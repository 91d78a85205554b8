"""Decoding: every kind of bad input gets its own machine-readable reason; good input keeps its metadata."""

from __future__ import annotations

import orjson
import pytest

from consumer.errors import BadInputError
from consumer.records import Origin
from consumer.stream.decoding import decode

ORIGIN = Origin("reviews", 0, 1)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "null_value"),
        (b"\xff\xfe{", "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"a string"', "not_an_object"),
        (b'{"text": "no id"}', "schema_violation"),
        (b'{"id": 5, "text": "numeric id"}', "schema_violation"),
        (b'{"id": "a", "text": null}', "schema_violation"),
        (b'{"id": "a", "text": "   \\n "}', "empty_text"),
        (orjson.dumps({"id": "a", "text": "x" * 2000}), "text_too_long"),
    ],
)
def test_bad_input_has_a_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(BadInputError) as info:
        decode(value, ORIGIN, max_text_bytes=1000)
    assert info.value.reason == reason


def test_good_input_keeps_metadata() -> None:
    review = decode(b'{"id": "r1", "text": "Fine.", "label": "positive", "shop": 3}', ORIGIN, 1000)
    assert (review.id, review.text) == ("r1", "Fine.")
    assert review.metadata == {"label": "positive", "shop": 3}
