"""The stand-in's request handlers: a provider that misbehaves on purpose, and counts what it did.

It behaves like a real provider: latency, its own requests/minute and tokens/minute limits in rolling
60 s windows (answered with 429, ``Retry-After``, ``retry-after-ms`` and ``x-ratelimit-*`` headers), 5xx
errors, timeouts (a request held longer than the client waits), malformed bodies, answers outside the
offered labels, and token usage in every answer. Faults can be changed while it runs (``POST /control``),
e.g. a 429 storm: ``{"storm": {"requests": 3, "retry_after_s": 2}}``. ``GET /stats``: see
:mod:`consumer.sandbox.standin.stats`. The Batch API (files and batches): :mod:`consumer.sandbox.standin.batches`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import structlog
from aiohttp import web

from consumer.llm.prompting import count_prompt_tokens, count_tokens
from consumer.sandbox.standin import wire
from consumer.sandbox.standin.batches import BatchDesk
from consumer.sandbox.standin.config import RATES, StandinConfig, apply_control
from consumer.sandbox.standin.limits import Limits, Storm
from consumer.sandbox.standin.policies import Policy, make_policy
from consumer.sandbox.standin.stats import Stats

log = structlog.get_logger(__name__)

DISTRACTORS = ("neutral", "mixed", "unknown", "other", "none of these")


class StandinApp:
    """The request handlers and everything they count. :class:`StandinServer` runs it on a port."""

    def __init__(self, config: StandinConfig, policy: Policy | None = None) -> None:
        self.config = config
        self.faults = config.faults
        self._policy = policy or make_policy(config)
        self._rng = random.Random(config.seed)
        self._limits = Limits()
        self._storm = Storm()
        self._stats = Stats(config.keep_bodies)
        self._desk = BatchDesk(
            lambda: self._stats.counters, self.answer_body, lambda: self.faults, config.seed, self._authorised
        )
        self.closing = asyncio.Event()

    def __repr__(self) -> str:
        return f"StandinApp(policy={self.config.policy!r}, faults={self.faults!r})"

    @property
    def counters(self) -> dict[str, int]:
        """The ``/stats`` counters, live."""
        return self._stats.counters

    def web_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # batch input files are large
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats_handler)
        app.router.add_post("/control", self.control_handler)
        self._desk.routes(app)
        return app

    def stats(self) -> dict[str, Any]:
        """Counters, the current fault settings and the last request bodies."""
        return {
            **self.counters,
            "faults": dataclasses.asdict(self.faults),
            "storm_active": self._storm.active(time.monotonic()),
            "recent_requests": list(self._stats.bodies),
        }

    def control(self, changes: Mapping[str, Any]) -> None:
        """Change faults at run time. ``storm``: {requests, seconds, retry_after_s}; ``reset_stats``: true."""
        changes = dict(changes)
        storm = changes.pop("storm", None)
        if changes.pop("reset_stats", False):
            self._stats.reset()
            self._desk.reset()
        self.faults = apply_control(self.faults, changes)
        if storm is not None:
            if not isinstance(storm, dict):
                raise ValueError('storm must be an object like {"requests": 3, "retry_after_s": 2}')
            self._storm = Storm(
                requests=int(storm.get("requests", 0)),
                until=time.monotonic() + float(storm.get("seconds", 0.0)) if storm.get("seconds") else -math.inf,
                retry_after_s=float(storm.get("retry_after_s", 2.0)),
            )
        log.info("standin_control", faults=dataclasses.asdict(self.faults), storm=storm)

    async def stats_handler(self, request: web.Request) -> web.Response:
        return wire.json_response(200, self.stats())

    async def control_handler(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            self.control(changes)
        except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
            return wire.error(400, "invalid_request_error", str(exc))
        return wire.json_response(200, {"faults": dataclasses.asdict(self.faults)})

    async def models(self, request: web.Request) -> web.Response:
        return wire.json_response(200, {"object": "list", "data": [{"id": self.config.model, "object": "model"}]})

    async def chat(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        self._stats.arrive(now)
        body = await wire.read_json(request)
        if body is None or not isinstance(body.get("messages"), list):
            self.counters["bad_requests"] += 1
            return wire.error(400, "invalid_request_error", "the body is not a chat completion request")
        self._stats.bodies.append(body)
        if not self._authorised(request):
            return self._unauthorised(request)
        limited = self._rate_limit(now, body)
        if limited is not None:
            return limited
        return await self._answer(request, body)

    def _authorised(self, request: web.Request) -> bool:
        return self.config.api_key is None or request.headers.get("Authorization") == f"Bearer {self.config.api_key}"

    def _unauthorised(self, request: web.Request) -> web.Response:
        self.counters["auth_failures"] += 1
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        # Echo the key we got, as some providers do (in part): clients must not pass it on.
        return wire.error(401, "invalid_request_error", f"Incorrect API key provided: {given}")

    def _rate_limit(self, now: float, body: Mapping[str, Any]) -> web.Response | None:
        if self._storm.active(now):
            self._storm.take()
            return self._too_many(now, self._storm.retry_after_s, exact=False)
        estimate = wire.estimate(body)
        wait = self._limits.wait_s(now, estimate, self.faults)
        if wait > 0:
            return self._too_many(now, wait, exact=True)
        self._limits.admit(now, estimate)
        return None

    def _too_many(self, now: float, wait_s: float, *, exact: bool) -> web.Response:
        """A 429. ``exact``: also ``retry-after-ms``, and that (not the rounded-up seconds) is in force."""
        self.counters["rate_limited_sent"] += 1
        headers = self._limits.headers(now, self.faults) | {"Retry-After": str(math.ceil(wait_s))}
        in_force = float(math.ceil(wait_s))
        if exact:
            millis = math.ceil(wait_s * 1000)
            headers["retry-after-ms"] = str(millis)
            in_force = millis / 1000
        self._stats.retry_after_sent(now + in_force)
        message = f"Rate limit reached for {self.config.model}. Please try again in {wait_s:.3f}s."
        return wire.error(429, "rate_limit_exceeded", message, headers)

    def _roll(self) -> str | None:
        draw = self._rng.random()
        for name in RATES:
            rate: float = getattr(self.faults, name)
            if draw < rate:
                return name
            draw -= rate
        return None

    async def _answer(self, request: web.Request, body: Mapping[str, Any]) -> web.Response:
        fault = self._roll()
        if fault == "timeout_rate":
            self.counters["timeouts_injected"] += 1
            await self._hang()
            return wire.error(504, "timeout", "upstream timed out")
        low, high = self.faults.latency_ms
        await asyncio.sleep(self._rng.uniform(low, high) / 1000)
        if fault == "error_rate":
            self.counters["errors_injected"] += 1
            return wire.error(self._rng.choice((500, 502, 503)), "server_error", "the stand-in failed on purpose")
        text, allowed = wire.question(body)
        if not allowed:
            self.counters["bad_requests"] += 1
            return wire.error(400, "invalid_request_error", "cannot tell which labels are allowed")
        if fault == "malformed_rate":
            self.counters["malformed_sent"] += 1
            return self._malformed()
        label = self._choose(text, request.headers.get("X-Review-Id"), allowed, fault == "out_of_set_rate")
        return self._completion(body, label)

    async def _hang(self) -> None:
        try:
            async with asyncio.timeout(self.faults.hang_s):
                await self.closing.wait()
        except TimeoutError:
            pass

    def _choose(self, text: str, review_id: str | None, allowed: Sequence[str], out_of_set: bool) -> str:
        if out_of_set:
            self.counters["out_of_set_sent"] += 1
            return next(label for label in (*DISTRACTORS, "x" + "".join(allowed)) if label not in allowed)
        label = self._policy.answer(text, review_id, allowed)
        if label is None:
            self.counters["unmatched"] += 1
            return allowed[0]
        return label

    def answer_body(self, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """A batch request's answer, as the chat endpoint would give it (no latency, limits or faults; the
        batch faults are the batch desk's). Counted in the batch counters, not the chat ones."""
        messages = body.get("messages")
        text, allowed = wire.question(body) if isinstance(messages, list) else ("", ())
        if not allowed:
            return 400, {"error": {"message": "cannot tell which labels are allowed", "type": "invalid_request_error"}}
        label = self._choose(text, None, allowed, out_of_set=False)
        content, usage = self._content(body, label)
        return 200, wire.chat_body(self.config.model, content, usage)

    @staticmethod
    def _content(body: Mapping[str, Any], label: str) -> tuple[str, dict[str, int]]:
        content = orjson.dumps({"label": label}).decode()
        usage = {
            "prompt_tokens": count_prompt_tokens(body["messages"]),
            "completion_tokens": count_tokens(content),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return content, usage

    def _completion(self, body: Mapping[str, Any], label: str) -> web.Response:
        content, usage = self._content(body, label)
        self.counters["answered"] += 1
        self.counters["prompt_tokens"] += usage["prompt_tokens"]
        self.counters["completion_tokens"] += usage["completion_tokens"]
        log.debug("standin_answer", label=label, **usage)
        return wire.json_response(
            200,
            wire.chat_body(self.config.model, content, usage),
            self._limits.headers(time.monotonic(), self.faults),
        )

    def _malformed(self) -> web.Response:
        kind = self._rng.choice(("not_json", "truncated", "no_usage"))
        if kind == "not_json":
            return web.Response(status=200, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        full = wire.chat_body(self.config.model, '{"label": "x"}', {"prompt_tokens": 1, "completion_tokens": 1})
        if kind == "no_usage":
            del full["usage"]
            return wire.json_response(200, full)
        raw = orjson.dumps(full)
        return web.Response(status=200, body=raw[: len(raw) // 2], content_type="application/json")
