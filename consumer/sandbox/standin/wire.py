"""The stand-in's wire format: reading a chat completion request, writing answers and errors as OpenAI does.

Token usage (documented estimate): prompt = :func:`consumer.llm.prompting.count_prompt_tokens` of the
messages, completion = ceil(UTF-8 bytes of the answer / 4). The review and the offered labels are read back
from the prompt (:func:`consumer.llm.prompting.parse_payload`), else from the JSON schema's enum.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from consumer.llm.prompting import count_prompt_tokens, parse_payload


def estimate(body: Mapping[str, Any]) -> int:
    """The tokens a request is charged on admission: its prompt and its completion limit."""
    limit = body.get("max_completion_tokens", body.get("max_tokens", 16))
    return count_prompt_tokens(body["messages"]) + (limit if isinstance(limit, int) else 16)


def question(body: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The review text and the offered labels: from our prompt format, else the JSON schema's enum."""
    try:
        payload = parse_payload(body["messages"])
    except ValueError:
        users = [m.get("content") for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        text = users[-1] if users and isinstance(users[-1], str) else ""
        return text, _schema_labels(body)
    return payload.review, payload.allowed_labels


def _schema_labels(body: Mapping[str, Any]) -> tuple[str, ...]:
    try:
        labels = body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"]
    except (KeyError, TypeError):
        return ()
    return tuple(label for label in labels if isinstance(label, str)) if isinstance(labels, list) else ()


def chat_body(model: str, content: str, usage: Mapping[str, int]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-standin-{random.getrandbits(48):012x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": dict(usage),
    }


async def read_json(request: web.Request) -> dict[str, Any] | None:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def json_response(status: int, data: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json", headers=headers)


def error(status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return json_response(status, {"error": {"message": message, "type": kind, "code": kind}}, headers)
