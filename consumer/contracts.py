"""The message contracts: JSON Schemas from ``schemas/``, compiled once, and orjson (de)serialisation.

The schemas are written for draft 2020-12 using only keywords that mean the same in draft 7, so
fastjsonschema (draft 7, generated code, microseconds a message) validates them on the hot path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import fastjsonschema
import orjson

from consumer.config import _packaged_or_repo

SchemaName = Literal["review", "labeled", "dlq", "metrics", "distill"]
SCHEMA_VERSIONS: dict[SchemaName, str] = {
    "review": "review.v1",
    "labeled": "labeled.v1",
    "dlq": "dlq.v1",
    "metrics": "metrics.v1",
    "distill": "distill.v1",
}
SCHEMA_DIR = _packaged_or_repo("schemas")


class ContractError(ValueError):
    """A message does not match its schema; ``path`` says where."""

    def __init__(self, schema: str, path: str, message: str) -> None:
        super().__init__(f"{schema}: {path}: {message}")
        self.schema = schema
        self.path = path


def schema_path(name: SchemaName) -> Path:
    return SCHEMA_DIR / f"{SCHEMA_VERSIONS[name]}.json"


@functools.cache
def load_schema(name: SchemaName) -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads(schema_path(name).read_bytes())
    return schema


@functools.cache
def _compiled(name: SchemaName) -> Callable[[Any], Any]:
    validator: Callable[[Any], Any] = fastjsonschema.compile(load_schema(name))
    return validator


def validate(name: SchemaName, message: Any) -> None:
    """Raise :class:`ContractError` when ``message`` does not match schema ``name``."""
    try:
        _compiled(name)(message)
    except fastjsonschema.JsonSchemaValueException as exc:
        path = str(exc.name or "data")
        raise ContractError(SCHEMA_VERSIONS[name], path, str(exc.message)) from None


def dumps(message: Mapping[str, Any]) -> bytes:
    """Serialise an outgoing message (orjson: fast, UTF-8, no NaN)."""
    return orjson.dumps(message)


def loads(raw: bytes) -> Any:
    return orjson.loads(raw)
