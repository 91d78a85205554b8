"""A client for any OpenAI-compatible Chat Completions endpoint: one request in, a typed answer or error out.

``POST {base_url}/chat/completions`` on one shared aiohttp session (connect and read timeouts, a connector
bounded to ``max_concurrency``). Responses map to the error classes of :mod:`consumer.errors`:

* statuses map through :func:`consumer.errors.llm_http_error` (the LLM failure policy): 429 ->
  :class:`RateLimitedError` with the wait the provider asked for (``retry-after-ms``, then ``Retry-After``
  in seconds or as an HTTP date, then ``x-ratelimit-reset-requests/-tokens``; the pool caps it);
  408, 409, 5xx -> :class:`TransientLlmError`; 401/403 -> :class:`AuthFailedError`; other 4xx ->
  :class:`RequestRejectedError` (this request only);
* timeouts and dropped connections -> :class:`TransientLlmError` (timeouts: :class:`LlmTimeoutError`);
* a body that is not a chat completion, has no usage or is over ``llm.max_response_bytes`` (never read
  whole) -> :class:`MalformedResponseError`; an answer that is not exactly ``{"label": <allowed label>}``
  -> :class:`InvalidAnswerError`. Both are :class:`PermanentLlmError` with a machine-readable ``reason``.

The review id goes in ``X-Review-Id`` only as printable ASCII: anything else (a control character is
allowed by ``review.v1``) is percent-encoded, and an id too long for a header is left out.

The API key is sent as a Bearer header and nowhere else: error messages are built from status codes and
scrubbed snippets, exceptions are raised ``from None`` (aiohttp's carry the request headers), and the repr
names only the URL and the model.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import re
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import aiohttp
import orjson

from consumer.config import LlmConfig
from consumer.errors import (
    AuthFailedError,
    BreakerEffect,
    PermanentLlmError,
    RequestRejectedError,
    TransientLlmError,
    llm_http_error,
)
from consumer.llm.prompting import Prompt

_SNIPPET = 200
_REDACTED = "**********"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|us|µs|ns|h|m|s))+")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_MAX_ID_HEADER = 512
_CHUNK = 64 * 1024
__all__ = ["AuthFailedError", "RequestRejectedError"]  # re-exported: they are part of what complete() raises


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens the provider says it counted for one request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class LlmTimeoutError(TransientLlmError):
    """The provider did not connect or answer in time."""


class MalformedResponseError(PermanentLlmError):
    """A 2xx whose body is not a usable chat completion (not JSON, no choices, no usage)."""

    reason = "malformed_response"


class InvalidAnswerError(PermanentLlmError):
    """The model answered, but not with exactly one allowed label. The tokens were still paid for."""

    reason = "invalid_answer"
    breaker: ClassVar[BreakerEffect] = "healthy"  # the provider is up; the model just answered badly

    def __init__(self, detail: str, usage: Usage | None = None) -> None:
        super().__init__(detail)
        self.usage = usage


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """The provider's ``x-ratelimit-*`` view of our budget after one request (None: not sent)."""

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None

    def exhausted_pause_s(self, default_s: float = 1.0) -> float | None:
        """How long to hold the pool when a remaining count reached 0 (None: nothing is exhausted)."""
        waits = [
            default_s if reset is None else reset
            for remaining, reset in (
                (self.remaining_requests, self.reset_requests_s),
                (self.remaining_tokens, self.reset_tokens_s),
            )
            if remaining is not None and remaining <= 0
        ]
        return max(waits) if waits else None


@dataclass(frozen=True, slots=True)
class Completion:
    """One usable answer."""

    label: str
    usage: Usage
    limits: RateLimitHeaders
    latency_ms: float


def parse_duration(value: str | None) -> float | None:
    """Seconds from ``"2"``, ``"1.5"``, or Go-style durations as OpenAI sends them (``"6m0s"``, ``"250ms"``)."""
    if value is None:
        return None
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        return number if math.isfinite(number) and number >= 0 else None
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(amount) * _UNIT_S[unit] for amount, unit in _DURATION_PART.findall(text))


def rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders:
    """Read ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` (any mapping; names matched case-blind)."""
    h = {key.lower(): value for key, value in headers.items()}
    return RateLimitHeaders(
        remaining_requests=_int(h.get("x-ratelimit-remaining-requests")),
        remaining_tokens=_int(h.get("x-ratelimit-remaining-tokens")),
        reset_requests_s=parse_duration(h.get("x-ratelimit-reset-requests")),
        reset_tokens_s=parse_duration(h.get("x-ratelimit-reset-tokens")),
    )


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a 429 asks for: ``retry-after-ms``, else ``Retry-After`` (seconds or an HTTP date, compared
    with the wall clock ``now``), else the reset time of the exhausted ``x-ratelimit`` dimension (or the
    sooner one when neither says it is exhausted). None when the provider did not say."""
    h = {key.lower(): value for key, value in headers.items()}
    millis = parse_duration(h.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    if (value := h.get("retry-after")) is not None:
        seconds = parse_duration(value)
        if seconds is not None:
            return seconds
        when = _http_date(value)
        if when is not None:
            return max(0.0, when - (time.time() if now is None else now))
    limits = rate_limit_headers(h)
    pairs = (
        (limits.remaining_requests, limits.reset_requests_s),
        (limits.remaining_tokens, limits.reset_tokens_s),
    )
    exhausted = [reset for remaining, reset in pairs if remaining is not None and remaining <= 0 and reset is not None]
    resets = exhausted or [reset for _, reset in pairs if reset is not None]
    if not resets:
        return None
    return max(resets) if exhausted else min(resets)


def parse_label(content: str, allowed: Sequence[str], usage: Usage | None = None) -> str:
    """Strictly: the content must be a JSON object with one key, ``label``, whose value is allowed."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise InvalidAnswerError("the answer is not JSON", usage) from None
    if not isinstance(data, dict) or set(data) != {"label"} or not isinstance(data["label"], str):
        raise InvalidAnswerError('the answer is not an object {"label": ...}', usage)
    label: str = data["label"]
    if label not in allowed:
        raise InvalidAnswerError(f"the answer {label[:40]!r} is not one of the allowed labels", usage)
    return label


class LlmClient:
    """Chat Completions over one aiohttp session. Use as ``async with LlmClient(config) as client``."""

    def __init__(self, config: LlmConfig) -> None:
        self._config = config
        self._url = f"{config.base_url}/chat/completions"
        key = config.resolved_api_key()
        self._key = key.get_secret_value() if key is not None else None
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"LlmClient(url={self._url!r}, model={self._config.model!r})"

    async def __aenter__(self) -> LlmClient:
        timeout = aiohttp.ClientTimeout(
            total=self._config.connect_timeout_s + self._config.read_timeout_s,
            connect=self._config.connect_timeout_s,
            sock_connect=self._config.connect_timeout_s,
            sock_read=self._config.read_timeout_s,
        )
        connector = aiohttp.TCPConnector(limit=self._config.max_concurrency)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, raise_for_status=False)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def request_body(self, prompt: Prompt) -> dict[str, Any]:
        """The JSON body for one prompt (public so tests can check what is sent)."""
        body: dict[str, Any] = {
            "model": self._config.model,
            "messages": list(prompt.messages),
            "max_completion_tokens": self._config.max_completion_tokens,
            "temperature": 0,
        }
        if self._config.json_schema_response:
            body["response_format"] = _label_schema(prompt.allowed_labels)
        return body

    async def complete(self, prompt: Prompt, review_id: str | None = None) -> Completion:
        """Send one prompt; return the parsed answer or raise a typed :class:`~consumer.errors.LlmError`."""
        if self._session is None:
            raise RuntimeError("LlmClient used outside 'async with'")
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        header_id = review_id_header(review_id)
        if header_id is not None:
            headers["X-Review-Id"] = header_id
        started = time.monotonic()
        try:
            async with self._session.post(
                self._url, data=orjson.dumps(self.request_body(prompt)), headers=headers
            ) as r:
                status, response_headers = r.status, r.headers
                raw, whole = await _read_capped(r.content, self._config.max_response_bytes)
        except TimeoutError:
            raise LlmTimeoutError("the provider did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise TransientLlmError(self._scrub(f"connection failed: {type(exc).__name__}: {exc}")) from None
        latency_ms = (time.monotonic() - started) * 1000.0
        return self._interpret(status, response_headers, raw if whole else None, prompt, latency_ms)

    def _interpret(
        self, status: int, headers: Mapping[str, str], raw: bytes | None, prompt: Prompt, latency_ms: float
    ) -> Completion:
        """``raw`` is None when the body was over ``max_response_bytes``."""
        error = llm_http_error(
            status, self._describe(status, raw or b""), retry_after_s(headers) if status == 429 else None
        )
        if error is not None:
            raise error
        if raw is None:
            raise MalformedResponseError(f"the response body is over {self._config.max_response_bytes} bytes")
        content, usage = completion_parts(raw)
        label = parse_label(content, prompt.allowed_labels, usage)
        return Completion(label, usage, rate_limit_headers(headers), latency_ms)

    def _describe(self, status: int, raw: bytes) -> str:
        if status == 429:
            return "rate limited (429)"
        if status in (408, 409) or status >= 500:
            return f"provider error {status}: {self._snippet(raw)}"
        return f"request rejected ({status}): {self._snippet(raw)}"

    def _snippet(self, raw: bytes) -> str:
        return self._scrub(raw[:_SNIPPET].decode("utf-8", errors="replace"))

    def _scrub(self, text: str) -> str:
        # Some providers echo the key they got (or part of it) in error bodies.
        if self._key:
            text = text.replace(self._key, _REDACTED)
        return text


def review_id_header(review_id: str | None) -> str | None:
    """The ``X-Review-Id`` value for an id: as is when printable ASCII, else percent-encoded UTF-8; None
    when there is no id or it is too long for a header (the stand-in matches by text anyway)."""
    if review_id is None:
        return None
    value = review_id if review_id.isascii() and review_id.isprintable() else urllib.parse.quote(review_id, safe="")
    return value if len(value) <= _MAX_ID_HEADER else None


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a body, and whether that was all of it (a larger body is never held whole)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            chunks.append(chunk[: len(chunk) - (size - limit)])
            return b"".join(chunks), False
        chunks.append(chunk)
    return b"".join(chunks), True


def completion_parts(raw: bytes) -> tuple[str, Usage]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedResponseError("the response body is not JSON") from None
    try:
        usage = Usage(_count(doc["usage"]["prompt_tokens"]), _count(doc["usage"]["completion_tokens"]))
    except (KeyError, TypeError, ValueError):
        raise MalformedResponseError("the response has no usable token usage") from None
    try:
        message = doc["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise MalformedResponseError("the response has no choices[0].message") from None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise InvalidAnswerError("the answer has no text content (refused or empty)", usage)
    return content, usage


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("not a token count")
    return value


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _http_date(value: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    # HTTP dates are always GMT; a date without a zone ("-0000") is read as UTC, not local time.
    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()


def _label_schema(allowed: Sequence[str]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": list(allowed)}},
        "required": ["label"],
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": "review_label", "strict": True, "schema": schema}}
