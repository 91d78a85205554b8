"""Every schema is itself valid (draft 2020-12) and accepts and rejects what it should, with both validators."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from consumer import contracts
from consumer.contracts import SCHEMA_VERSIONS, ContractError, SchemaName

POSITION = {"topic": "reviews", "partition": 0, "offset": 7}
COUNTS = {
    "reviews_in": 3, "labeled": 3, "small": 2, "large": 1, "fallback": 0, "cache_hits": 0, "dlq": 0,
    "dlq_by_reason": {}, "llm_requests": 1, "llm_retries": 0, "llm_429s": 0, "llm_errors": 0, "prompt_tokens": 90,
    "completion_tokens": 5, "cost_usd": 0.0001, "baseline_cost_usd": 0.0003,
}  # fmt: skip
VALID: dict[SchemaName, dict[str, Any]] = {
    "review": {"id": "r1", "text": "Lovely kettle.", "shop": "x"},
    "labeled": {
        "schema_version": "labeled.v1", "id": "r1", "label": "positive", "confidence": 0.97, "source": "small",
        "fallback_reason": None, "small": {"label": "positive", "confidence": 0.97, "probs": {"positive": 0.97,
        "negative": 0.03}}, "llm": None, "cost_usd": 0.0, "threshold": 0.9, "model_version": "m1",
        "prompt_version": None, "input": POSITION, "metadata": {}, "instance_id": "i1", "processed_at_ms": 1,
        "latency_ms": 3.5,
    },
    "dlq": {
        "schema_version": "dlq.v1", "reason": "invalid_json", "detail": "bad", "review_id": None, "input": POSITION,
        "original_b64": "e30=", "key_b64": None, "headers": [{"key": "h", "value_b64": "eA=="}],
        "instance_id": "i1", "failed_at_ms": 1,
    },
    "distill": {
        "schema_version": "distill.v1", "id": "r1", "text": "t", "llm_label": "negative", "small_label": "positive",
        "small_confidence": 0.6, "small_probs": {"positive": 0.6, "negative": 0.4}, "model_version": "m1",
        "llm_model": "standin", "prompt_version": "s4l-v1", "created_at_ms": 5,
    },
    "metrics": {
        "schema_version": "metrics.v1", "instance_id": "i1", "group_id": "g", "seq": 0, "final": False,
        "window_start_ms": 0, "window_end_ms": 10, "window": COUNTS, "totals": COUNTS, "shunt_rate": 0.33,
        "cost_ratio": 0.33, "breaker_state": "closed",
        "latency_ms": {"small": {"count": 2, "p50": 1.0, "p95": 2.0, "p99": 2.0}}, "queues": {"llm_backlog": 0},
        "lag": {"reviews/0": 0}, "threshold": 0.9, "model_version": "m1", "prompt_version": "s4l-v1",
        "llm_model": "standin",
    },
}  # fmt: skip
INVALID: list[tuple[SchemaName, dict[str, Any]]] = [
    ("review", {"text": "no id"}),
    ("review", {"id": "r", "text": 5}),
    ("review", {"id": "", "text": "empty id"}),
    ("labeled", VALID["labeled"] | {"source": "psychic"}),
    ("labeled", VALID["labeled"] | {"confidence": 1.5}),
    ("labeled", {k: v for k, v in VALID["labeled"].items() if k != "input"}),
    ("labeled", VALID["labeled"] | {"surprise": 1}),
    ("dlq", VALID["dlq"] | {"reason": "gremlins"}),
    ("distill", VALID["distill"] | {"small_confidence": -0.1}),
    ("metrics", VALID["metrics"] | {"breaker_state": "melted"}),
    ("metrics", VALID["metrics"] | {"totals": COUNTS | {"cost_usd": -1}}),
]


@pytest.mark.parametrize("name", list(SCHEMA_VERSIONS))
def test_schema_is_valid_2020_12(name: SchemaName) -> None:
    schema = contracts.load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", list(SCHEMA_VERSIONS))
def test_valid_examples_pass_both_validators(name: SchemaName) -> None:
    contracts.validate(name, VALID[name])
    jsonschema.Draft202012Validator(contracts.load_schema(name)).validate(VALID[name])


@pytest.mark.parametrize(("name", "message"), INVALID)
def test_invalid_examples_fail_both_validators(name: SchemaName, message: dict[str, Any]) -> None:
    with pytest.raises(ContractError):
        contracts.validate(name, message)
    assert not jsonschema.Draft202012Validator(contracts.load_schema(name)).is_valid(message)
