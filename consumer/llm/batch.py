"""The provider's Batch API over aiohttp: the half-price lane for reviews that can wait.

``POST /files`` (multipart, purpose ``batch``) uploads a JSONL of chat requests, ``POST /batches`` creates
the batch (``completion_window`` 24h, a ``metadata`` key naming what it covers), ``GET /batches`` (paginated
with ``after``/``limit``/``has_more``) finds it again after a restart, ``GET /batches/{id}`` polls it and
``GET /files/{id}/content`` downloads its output and error files.

Each request line carries the same body the online client sends (:meth:`LlmClient.request_body`, from the
same S4L prompt); each output line is read with the online client's own parsing, so an answer outside the
offered labels is an :class:`InvalidAnswerError` here too. HTTP failures map through
:func:`consumer.errors.llm_http_error`; the caller decides to retry. The API key goes in the Bearer header
only and the repr names only the URL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from consumer.config import LlmConfig
from consumer.errors import LlmError, TransientLlmError, llm_http_error
from consumer.llm.client import (
    InvalidAnswerError,
    LlmClient,
    MalformedResponseError,
    Usage,
    completion_parts,
    parse_label,
)
from consumer.llm.prompting import Prompt

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
KEY_FIELD = "shunt_key"
GROUP_FIELD = "shunt_group"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_PAGE = 100


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """What the provider says about one batch."""

    id: str
    status: str
    metadata: Mapping[str, str]
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BatchInfo:
        counts = doc.get("request_counts") or {}
        metadata = doc.get("metadata") or {}
        return cls(
            id=str(doc["id"]),
            status=str(doc["status"]),
            metadata={str(k): str(v) for k, v in metadata.items()},
            input_file_id=str(doc.get("input_file_id", "")),
            output_file_id=doc.get("output_file_id"),
            error_file_id=doc.get("error_file_id"),
            total=int(counts.get("total", 0)),
            completed=int(counts.get("completed", 0)),
            failed=int(counts.get("failed", 0)),
        )


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One request's result: a label and its usage, or an error code (``batch_expired``, ``http_500``...).

    An answer outside the offered labels is an error (``invalid_answer``) whose usage was still billed."""

    custom_id: str
    label: str | None
    usage: Usage | None
    error: str | None = None


def request_line(custom_id: str, body: Mapping[str, Any]) -> bytes:
    """One JSONL line of a batch input file."""
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}) + b"\n"


def request_file(client: LlmClient, prompts: Sequence[tuple[str, Prompt]]) -> bytes:
    """The batch input file for ``(custom_id, prompt)`` pairs: the online client's body, line by line."""
    return b"".join(request_line(custom_id, client.request_body(prompt)) for custom_id, prompt in prompts)


def parse_results(raw: bytes, allowed: Mapping[str, Sequence[str]]) -> dict[str, ItemResult]:
    """Read an output or error file: ``allowed`` maps each custom_id to the labels its prompt offered.

    Lines for unknown custom_ids and lines that are not JSON are skipped (the caller sees them missing)."""
    results: dict[str, ItemResult] = {}
    for line in raw.splitlines():
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        custom_id = doc.get("custom_id") if isinstance(doc, dict) else None
        if isinstance(custom_id, str) and custom_id in allowed:
            results[custom_id] = _item(custom_id, doc, allowed[custom_id])
    return results


def _item(custom_id: str, doc: Mapping[str, Any], allowed: Sequence[str]) -> ItemResult:
    error, response = doc.get("error"), doc.get("response")
    if error:
        code = error.get("code") if isinstance(error, dict) else None
        return ItemResult(custom_id, None, None, str(code or "batch_error"))
    if not isinstance(response, dict):
        return ItemResult(custom_id, None, None, "malformed_response")
    status = response.get("status_code")
    if status != 200:
        return ItemResult(custom_id, None, None, f"http_{status}")
    return _answer(custom_id, response.get("body"), allowed)


def _answer(custom_id: str, body: Any, allowed: Sequence[str]) -> ItemResult:
    """A 200 line's body, read as the online client reads a response."""
    try:
        content, usage = completion_parts(orjson.dumps(body))
        return ItemResult(custom_id, parse_label(content, allowed, usage), usage)
    except InvalidAnswerError as exc:
        return ItemResult(custom_id, None, exc.usage, exc.reason)
    except MalformedResponseError:
        return ItemResult(custom_id, None, None, "malformed_response")


class BatchApi:
    """The files and batches endpoints on one aiohttp session. ``async with BatchApi(config) as api``."""

    def __init__(self, config: LlmConfig) -> None:
        self._base = config.base_url
        self._timeout = aiohttp.ClientTimeout(
            total=config.connect_timeout_s + config.read_timeout_s, connect=config.connect_timeout_s
        )
        key = config.resolved_api_key()
        self._headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"BatchApi(url={self._base!r})"

    async def __aenter__(self) -> BatchApi:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers, raise_for_status=False)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def upload(self, content: bytes, filename: str) -> str:
        """Upload a batch input file; returns its file id."""
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=filename, content_type="application/jsonl")
        doc = await self._json("POST", "/files", data=form)
        return str(doc["id"])

    async def create(self, input_file_id: str, metadata: Mapping[str, str]) -> BatchInfo:
        body = {
            "input_file_id": input_file_id,
            "endpoint": ENDPOINT,
            "completion_window": COMPLETION_WINDOW,
            "metadata": dict(metadata),
        }
        return BatchInfo.from_json(await self._json("POST", "/batches", data=orjson.dumps(body), json_body=True))

    async def get(self, batch_id: str) -> BatchInfo:
        return BatchInfo.from_json(await self._json("GET", f"/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchInfo:
        return BatchInfo.from_json(await self._json("POST", f"/batches/{batch_id}/cancel"))

    async def batches(self) -> AsyncIterator[BatchInfo]:
        """Every batch the provider lists, newest first, page by page."""
        after: str | None = None
        while True:
            params = {"limit": str(_PAGE)} | ({"after": after} if after else {})
            doc = await self._json("GET", "/batches", params=params)
            data = doc.get("data") or []
            for item in data:
                yield BatchInfo.from_json(item)
            if not doc.get("has_more") or not data:
                return
            after = str(doc.get("last_id") or data[-1]["id"])

    async def find(self, metadata: Mapping[str, str]) -> list[BatchInfo]:
        """The batches whose metadata holds every pair of ``metadata``."""
        return [b async for b in self.batches() if all(b.metadata.get(k) == v for k, v in metadata.items())]

    async def content(self, file_id: str) -> bytes:
        return await self._raw("GET", f"/files/{file_id}/content")

    async def _json(self, method: str, path: str, *, json_body: bool = False, **kwargs: Any) -> dict[str, Any]:
        raw = await self._raw(method, path, json_body=json_body, **kwargs)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise TransientLlmError(f"{method} {path}: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise TransientLlmError(f"{method} {path}: the answer is not a JSON object")
        return doc

    async def _raw(self, method: str, path: str, *, json_body: bool = False, **kwargs: Any) -> bytes:
        if self._session is None:
            raise RuntimeError("BatchApi used outside 'async with'")
        headers = {"Content-Type": "application/json"} if json_body else {}
        try:
            async with self._session.request(method, self._base + path, headers=headers, **kwargs) as r:
                status, raw = r.status, await r.read()
        except TimeoutError:
            raise TransientLlmError(f"{method} {path}: no answer in time") from None
        except aiohttp.ClientError as exc:
            raise TransientLlmError(f"{method} {path}: connection failed: {type(exc).__name__}") from None
        # The body is left out of the detail: some providers echo the key they were sent.
        error: LlmError | None = llm_http_error(status, f"{method} {path}: HTTP {status}")
        if error is not None:
            raise error
        return raw
