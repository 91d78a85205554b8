"""The Chat Completions client over real HTTP: what it sends, and how every kind of answer maps to a type."""

from __future__ import annotations

import asyncio
import email.utils
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from consumer.config import LlmConfig
from consumer.errors import AuthFailedError, LlmError, RateLimitedError, TransientLlmError
from consumer.llm.client import (
    InvalidAnswerError,
    LlmClient,
    LlmTimeoutError,
    MalformedResponseError,
    RateLimitHeaders,
    RequestRejectedError,
    parse_duration,
    parse_label,
    rate_limit_headers,
    retry_after_s,
    review_id_header,
)
from consumer.llm.prompting import build_prompt

pytestmark = pytest.mark.timeout(10)

KEY = "sk-test-client-4f9a1c7e2b"
PROBS = {"negative": 0.3, "positive": 0.7}


def completion(content: str | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    if usage is not None:
        body["usage"] = usage
    return body


USAGE = {"prompt_tokens": 50, "completion_tokens": 5}


@dataclass
class Scripted:
    """A provider that answers whatever the test says next, and remembers what it got."""

    status: int = 200
    body: bytes = orjson.dumps(completion('{"label": "positive"}', USAGE))
    headers: dict[str, str] = field(default_factory=dict)
    hang_s: float = 0.0
    received: list[tuple[dict[str, str], Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), orjson.loads(await request.read())))
        if self.hang_s:
            await asyncio.sleep(self.hang_s)  # the server side of a timeout: the client gives up first
        return web.Response(status=self.status, body=self.body, headers=self.headers)


@pytest.fixture
async def provider() -> AsyncIterator[tuple[Scripted, str]]:
    scripted = Scripted()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", scripted.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        yield scripted, str(server.make_url("/v1"))


def config(url: str, **extra: Any) -> LlmConfig:
    return LlmConfig(base_url=url, api_key=KEY, read_timeout_s=0.3, connect_timeout_s=0.5, **extra)


async def ask(url: str, **extra: Any) -> str:
    async with LlmClient(config(url, **extra)) as client:
        return (await client.complete(build_prompt("Nice.", PROBS, "s4l"), review_id="r1")).label


async def test_sends_the_prompt_with_key_schema_and_review_id(provider: tuple[Scripted, str]) -> None:
    scripted, url = provider
    assert await ask(url) == "positive"
    headers, body = scripted.received[0]
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["X-Review-Id"] == "r1"
    assert body["model"] == "standin" and body["max_completion_tokens"] == 20
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == ["negative", "positive"]
    assert schema["additionalProperties"] is False


async def test_without_json_schema_the_content_is_still_parsed_strictly(
    provider: tuple[Scripted, str],
) -> None:
    scripted, url = provider
    assert await ask(url, json_schema_response=False) == "positive"
    assert "response_format" not in scripted.received[0][1]


async def test_reports_usage_and_rate_limit_headers(provider: tuple[Scripted, str]) -> None:
    scripted, url = provider
    scripted.headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}
    async with LlmClient(config(url)) as client:
        done = await client.complete(build_prompt("Nice.", PROBS, "s4l"))
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total) == (50, 5, 55)
    assert done.limits.exhausted_pause_s() == 1.5
    assert done.latency_ms > 0


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (408, TransientLlmError),
        (409, TransientLlmError),
        (500, TransientLlmError),
        (503, TransientLlmError),
        (400, RequestRejectedError),
        (401, RequestRejectedError),
        (404, RequestRejectedError),
        (403, AuthFailedError),
        (401, AuthFailedError),
        (413, RequestRejectedError),
        (422, RequestRejectedError),
    ],
)
async def test_status_codes_map_to_types(provider: tuple[Scripted, str], status: int, error: type[LlmError]) -> None:
    scripted, url = provider
    scripted.status, scripted.body = status, b'{"error": {"message": "nope"}}'
    with pytest.raises(error):
        await ask(url)


async def test_429_carries_the_retry_after(provider: tuple[Scripted, str]) -> None:
    scripted, url = provider
    scripted.status, scripted.headers = 429, {"Retry-After": "3"}
    with pytest.raises(RateLimitedError) as caught:
        await ask(url)
    assert caught.value.retry_after_s == 3.0


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"<html>502 Bad Gateway</html>", MalformedResponseError),
        (orjson.dumps(completion('{"label": "positive"}'))[:-10], MalformedResponseError),
        (orjson.dumps(completion('{"label": "positive"}')), MalformedResponseError),  # no usage
        (orjson.dumps({"usage": USAGE}), MalformedResponseError),  # no choices
        (orjson.dumps(completion("positive", USAGE)), InvalidAnswerError),
        (orjson.dumps(completion('{"label": "neutral"}', USAGE)), InvalidAnswerError),
        (orjson.dumps(completion(None, USAGE)), InvalidAnswerError),  # a refusal
    ],
)
async def test_unusable_answers_are_permanent(
    provider: tuple[Scripted, str], body: bytes, error: type[LlmError]
) -> None:
    scripted, url = provider
    scripted.body = body
    with pytest.raises(error) as caught:
        await ask(url)
    if isinstance(caught.value, InvalidAnswerError):
        assert caught.value.usage is not None and caught.value.usage.total == 55  # still paid for


async def test_a_slow_provider_times_out(provider: tuple[Scripted, str]) -> None:
    scripted, url = provider
    scripted.hang_s = 2.0
    with pytest.raises(LlmTimeoutError):
        await ask(url)


async def test_a_closed_port_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientLlmError):
        await ask(f"http://127.0.0.1:{port}/v1")


async def test_the_key_is_scrubbed_from_errors_and_never_in_reprs(provider: tuple[Scripted, str]) -> None:
    scripted, url = provider
    scripted.status, scripted.body = 401, f'{{"error": "Incorrect API key provided: {KEY}"}}'.encode()
    client = LlmClient(config(url))
    async with client:
        with pytest.raises(RequestRejectedError) as caught:
            await client.complete(build_prompt("Nice.", PROBS, "s4l"))
    texts = [str(caught.value), repr(caught.value), repr(client), repr(config(url))]
    assert "Incorrect API key" in texts[0]
    assert not any(KEY in text for text in texts)
    assert caught.value.__context__ is None  # nothing chained that could carry request headers


def test_parse_label_is_strict() -> None:
    allowed = ("negative", "positive")
    assert parse_label('{"label": "positive"}', allowed) == "positive"
    assert parse_label(' {"label":"negative"}\n', allowed) == "negative"
    for bad in (
        '"positive"',
        '{"label": "positive", "why": "x"}',
        '{"label": 1}',
        '["positive"]',
        "```json\n{}```",
    ):
        with pytest.raises(InvalidAnswerError):
            parse_label(bad, allowed)


def test_parse_duration() -> None:
    assert parse_duration("2") == 2.0
    assert parse_duration("0.5") == 0.5
    assert parse_duration("1s") == 1.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("1h2m3.5s") == 3723.5
    assert parse_duration("soon") is None
    assert parse_duration("-1") is None
    assert parse_duration(None) is None


def test_retry_after_sources_in_order_of_precision() -> None:
    assert retry_after_s({"retry-after-ms": "1500", "Retry-After": "2"}) == 1.5
    assert retry_after_s({"Retry-After": "2"}) == 2.0
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert retry_after_s({"Retry-After": date}, now=1_000_000.0) == pytest.approx(30.0)
    assert retry_after_s({"Retry-After": email.utils.formatdate(0, usegmt=True)}) == 0.0  # in the past
    exhausted_tokens = {
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "100ms",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert retry_after_s(exhausted_tokens) == 360.0
    assert retry_after_s({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "250ms"}) == 0.25
    assert retry_after_s({}) is None


def test_rate_limit_headers_say_when_to_slow_down() -> None:
    assert rate_limit_headers({"X-RateLimit-Remaining-Requests": "5"}).exhausted_pause_s() is None
    assert RateLimitHeaders(remaining_tokens=0).exhausted_pause_s(default_s=1.0) == 1.0
    both = RateLimitHeaders(remaining_requests=0, remaining_tokens=0, reset_requests_s=0.2, reset_tokens_s=3.0)
    assert both.exhausted_pause_s() == 3.0


def test_review_ids_are_sent_safely() -> None:
    assert review_id_header("r-1:ok") == "r-1:ok"
    assert review_id_header("a\nb") == "a%0Ab"
    assert review_id_header("café") == "caf%C3%A9"
    assert review_id_header("x" * 600) is None and review_id_header(None) is None


async def test_a_review_id_with_a_control_character_is_sent_encoded(provider: tuple[Scripted, str]) -> None:
    scripted, url = provider
    async with LlmClient(config(url)) as client:
        done = await client.complete(build_prompt("Nice.", PROBS, "s4l"), review_id="a\r\nX-Injected: 1")
    headers = scripted.received[-1][0]
    assert done.label == "positive" and headers["X-Review-Id"] == "a%0D%0AX-Injected%3A%201"
    assert "X-Injected" not in headers


async def test_a_body_over_max_response_bytes_is_malformed_and_not_read_whole(
    provider: tuple[Scripted, str],
) -> None:
    scripted, url = provider
    scripted.body = b'{"pad": "' + b"x" * 3_000_000 + b'"}'
    with pytest.raises(MalformedResponseError, match="over 1048576 bytes"):
        await ask(url)
    scripted.status = 503  # an error body that large is only cut short: its status still decides
    with pytest.raises(TransientLlmError):
        await ask(url)
