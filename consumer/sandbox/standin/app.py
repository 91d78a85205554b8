"""A stand-in OpenAI-compatible Chat Completions server for tests, the demo and benchmarks.

It behaves like a real provider: latency, its own requests/minute and tokens/minute limits in rolling
60 s windows (answered with 429, ``Retry-After``, ``retry-after-ms`` and ``x-ratelimit-*`` headers), 5xx
errors, timeouts (a request held longer than the client waits), malformed bodies, answers outside the
offered labels, and token usage in every answer. Faults can be changed while it runs (``POST /control``),
e.g. a 429 storm: ``{"storm": {"requests": 3, "retry_after_s": 2}}``.

Answers come from a pluggable :class:`Policy`: ``replay`` answers what a label file records for the review,
``oracle`` answers the file's true label with probability ``accuracy`` (``hard_accuracy`` for rows marked
``"hard": true``), seeded by the text so it is repeatable, and a wrong one among the offered labels
otherwise; ``first`` answers the first offered label. The review and the offered labels are read back from
the prompt (:func:`consumer.llm.prompting.parse_payload`); a label file row matches by normalised text, else by
the ``X-Review-Id`` header.

Token usage (documented estimate): prompt = :func:`consumer.llm.prompting.count_prompt_tokens` of the messages,
completion = ceil(UTF-8 bytes of the answer / 4). Its TPM window charges prompt + ``max_completion_tokens``
when a request is admitted, as OpenAI does. ``x-ratelimit-reset-*`` is the time until the next request (or
enough tokens) fit again.

``GET /stats`` returns counters (requests, answered, rate_limited_sent, errors_injected, timeouts_injected,
malformed_sent, out_of_set_sent, unmatched, auth_failures, bad_requests, prompt_tokens, completion_tokens,
max_requests_in_any_60s_window, early_requests: requests that arrived while a Retry-After it had sent was
still in force) and the last request bodies it received (``recent_requests``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import random
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import orjson
import structlog
from aiohttp import web

from consumer.llm.prompting import count_prompt_tokens, count_tokens, normalise_text, parse_payload
from consumer.offline.labels import LabelBook

log = structlog.get_logger(__name__)

WINDOW_S = 60.0
DISTRACTORS = ("neutral", "mixed", "unknown", "other", "none of these")
PolicyName = Literal["replay", "oracle", "first"]
_RATES = ("error_rate", "timeout_rate", "malformed_rate", "out_of_set_rate")
_COUNTERS = (
    "requests", "answered", "rate_limited_sent", "errors_injected", "timeouts_injected", "malformed_sent",
    "out_of_set_sent", "unmatched", "auth_failures", "bad_requests", "prompt_tokens", "completion_tokens",
    "max_requests_in_any_60s_window", "early_requests",
)  # fmt: skip


@dataclass(frozen=True)
class Faults:
    """What can change while the server runs (``POST /control``)."""

    error_rate: float = 0.0
    timeout_rate: float = 0.0
    malformed_rate: float = 0.0
    out_of_set_rate: float = 0.0
    latency_ms: tuple[float, float] = (0.0, 0.0)
    hang_s: float = 30.0
    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        for name in _RATES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}")
        if sum(getattr(self, name) for name in _RATES) > 1.0 + 1e-9:
            raise ValueError("error, timeout, malformed and out-of-set rates add up to more than 1")
        low, high = self.latency_ms
        if not 0 <= low <= high:
            raise ValueError(f"latency must be LO-HI with 0 <= LO <= HI, got {low}-{high}")
        if self.hang_s < 0 or (self.rpm is not None and self.rpm < 1) or (self.tpm is not None and self.tpm < 1):
            raise ValueError("hang_s must be >= 0 and rpm/tpm >= 1 (or unset)")


@dataclass(frozen=True)
class StandinConfig:
    """How to start the stand-in. ``api_key``, when set, is required as a Bearer token (never shown)."""

    host: str = "127.0.0.1"
    port: int = 0
    policy: PolicyName = "first"
    labels: Path | None = None
    accuracy: float = 1.0
    hard_accuracy: float | None = None
    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    api_key: str | None = field(default=None, repr=False)
    model: str = "standin"
    keep_bodies: int = 50

    def __post_init__(self) -> None:
        if self.policy in ("replay", "oracle") and self.labels is None:
            raise ValueError(f"policy {self.policy!r} needs a label file (--labels FILE)")
        for name in ("accuracy", "hard_accuracy"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")


class Policy(Protocol):
    """Chooses the answer for one review; None means it does not know this review."""

    def answer(self, text: str, review_id: str | None, allowed: Sequence[str]) -> str | None: ...


class FirstPolicy:
    def answer(self, text: str, review_id: str | None, allowed: Sequence[str]) -> str | None:
        return allowed[0] if allowed else None


class ReplayPolicy:
    def __init__(self, book: LabelBook) -> None:
        self._book = book

    def answer(self, text: str, review_id: str | None, allowed: Sequence[str]) -> str | None:
        row = self._book.find(review_id, text)
        label = row.get("label") if row else None
        return label if isinstance(label, str) else None


class OraclePolicy:
    """Right with probability ``accuracy`` (``hard_accuracy`` for hard rows), repeatably per text."""

    def __init__(self, book: LabelBook, accuracy: float, hard_accuracy: float | None, seed: int) -> None:
        self._book, self._accuracy, self._seed = book, accuracy, seed
        self._hard_accuracy = accuracy if hard_accuracy is None else hard_accuracy

    def answer(self, text: str, review_id: str | None, allowed: Sequence[str]) -> str | None:
        row = self._book.find(review_id, text)
        if row is None or not isinstance(row.get("label"), str):
            return None
        truth: str = row["label"]
        digest = hashlib.sha256(f"{self._seed}\0{normalise_text(text)}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        accuracy = self._hard_accuracy if row.get("hard") else self._accuracy
        if rng.random() < accuracy and truth in allowed:
            return truth
        wrong = [label for label in allowed if label != truth]
        return rng.choice(wrong) if wrong else truth


def make_policy(config: StandinConfig) -> Policy:
    if config.policy == "first":
        return FirstPolicy()
    assert config.labels is not None  # checked by StandinConfig
    book = LabelBook.load(config.labels)
    if config.policy == "replay":
        return ReplayPolicy(book)
    return OraclePolicy(book, config.accuracy, config.hard_accuracy, config.seed)


def parse_latency(text: str) -> tuple[float, float]:
    """``"200-800"`` or ``"50"`` (milliseconds) -> (low, high). ValueError when it is neither."""
    low, sep, high = text.partition("-")
    try:
        pair = (float(low), float(high) if sep else float(low))
    except ValueError:
        raise ValueError(f"expected LO-HI milliseconds like 200-800, got {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise ValueError(f"expected 0 <= LO <= HI, got {text!r}")
    return pair


def go_duration(seconds: float) -> str:
    """Seconds as OpenAI writes ``x-ratelimit-reset-*``: ``"250ms"``, ``"1.5s"``, ``"6m0s"``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def apply_control(faults: Faults, changes: Mapping[str, Any]) -> Faults:
    """``faults`` with the fields in ``changes`` replaced; ValueError on unknown fields or bad values."""
    known = {f.name for f in dataclasses.fields(Faults)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown fault settings: {sorted(unknown)}")
    values = dict(changes)
    if "latency_ms" in values:
        low, high = values["latency_ms"]
        values["latency_ms"] = (float(low), float(high))
    return dataclasses.replace(faults, **values)


class _Limits:
    """The stand-in's own RPM/TPM: what it admitted in the last 60 s."""

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_total = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_total -= self.tokens.popleft()[1]

    def wait_s(self, now: float, estimate: int, faults: Faults) -> float:
        """0 when one more request of ``estimate`` tokens fits both limits, else how long until it does."""
        self.expire(now)
        waits = [0.0]
        if faults.rpm is not None and len(self.requests) >= faults.rpm:
            waits.append(self.requests[len(self.requests) - faults.rpm] + WINDOW_S - now)
        if faults.tpm is not None and self.token_total + estimate > faults.tpm:
            waits.append(self._token_wait(now, self.token_total + estimate - faults.tpm))
        return max(waits)

    def _token_wait(self, now: float, excess: int) -> float:
        freed = 0
        for at, amount in self.tokens:
            freed += amount
            if freed >= excess:
                return at + WINDOW_S - now
        return WINDOW_S  # larger than the whole limit: say a minute, it will never fit

    def admit(self, now: float, estimate: int) -> None:
        self.requests.append(now)
        self.tokens.append((now, estimate))
        self.token_total += estimate

    def headers(self, now: float, faults: Faults) -> dict[str, str]:
        self.expire(now)
        out: dict[str, str] = {}
        if faults.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(faults.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, faults.rpm - len(self.requests)))
            out["x-ratelimit-reset-requests"] = go_duration(self._request_reset(now, faults.rpm))
        if faults.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(faults.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, faults.tpm - self.token_total))
            out["x-ratelimit-reset-tokens"] = go_duration(self.tokens[0][0] + WINDOW_S - now if self.tokens else 0.0)
        return out

    def _request_reset(self, now: float, rpm: int) -> float:
        if len(self.requests) < rpm:
            return 0.0
        return self.requests[len(self.requests) - rpm] + WINDOW_S - now


@dataclass
class _Storm:
    requests: int = 0
    until: float = -math.inf
    retry_after_s: float = 2.0

    def active(self, now: float) -> bool:
        return self.requests > 0 or now < self.until

    def take(self) -> None:
        self.requests = max(0, self.requests - 1)


class StandinApp:
    """The request handlers and everything they count. :class:`StandinServer` runs it on a port."""

    def __init__(self, config: StandinConfig, policy: Policy | None = None) -> None:
        self.config = config
        self.faults = config.faults
        self._policy = policy or make_policy(config)
        self._rng = random.Random(config.seed)
        self._limits = _Limits()
        self._storm = _Storm()
        self._arrivals: deque[float] = deque()
        self._retry_until = -math.inf
        self._bodies: deque[Any] = deque(maxlen=config.keep_bodies)
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.closing = asyncio.Event()

    def __repr__(self) -> str:
        return f"StandinApp(policy={self.config.policy!r}, faults={self.faults!r})"

    def web_app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats_handler)
        app.router.add_post("/control", self.control_handler)
        return app

    def stats(self) -> dict[str, Any]:
        """Counters, the current fault settings and the last request bodies."""
        return {
            **self.counters,
            "faults": dataclasses.asdict(self.faults),
            "storm_active": self._storm.active(time.monotonic()),
            "recent_requests": list(self._bodies),
        }

    def control(self, changes: Mapping[str, Any]) -> None:
        """Change faults at run time. ``storm``: {requests, seconds, retry_after_s}; ``reset_stats``: true."""
        changes = dict(changes)
        storm = changes.pop("storm", None)
        if changes.pop("reset_stats", False):
            self.counters = dict.fromkeys(_COUNTERS, 0)
            self._bodies.clear()
        self.faults = apply_control(self.faults, changes)
        if storm is not None:
            if not isinstance(storm, dict):
                raise ValueError('storm must be an object like {"requests": 3, "retry_after_s": 2}')
            self._storm = _Storm(
                requests=int(storm.get("requests", 0)),
                until=time.monotonic() + float(storm.get("seconds", 0.0)) if storm.get("seconds") else -math.inf,
                retry_after_s=float(storm.get("retry_after_s", 2.0)),
            )
        log.info("standin_control", faults=dataclasses.asdict(self.faults), storm=storm)

    async def stats_handler(self, request: web.Request) -> web.Response:
        return _json(200, self.stats())

    async def control_handler(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            self.control(changes)
        except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
            return _error(400, "invalid_request_error", str(exc))
        return _json(200, {"faults": dataclasses.asdict(self.faults)})

    async def models(self, request: web.Request) -> web.Response:
        return _json(200, {"object": "list", "data": [{"id": self.config.model, "object": "model"}]})

    async def chat(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        self._arrive(now)
        body = await _read_json(request)
        if body is None or not isinstance(body.get("messages"), list):
            self.counters["bad_requests"] += 1
            return _error(400, "invalid_request_error", "the body is not a chat completion request")
        self._bodies.append(body)
        if not self._authorised(request):
            return self._unauthorised(request)
        limited = self._rate_limit(now, body)
        if limited is not None:
            return limited
        return await self._answer(request, body)

    def _arrive(self, now: float) -> None:
        self.counters["requests"] += 1
        if now < self._retry_until:
            self.counters["early_requests"] += 1
        self._arrivals.append(now)
        while self._arrivals[0] <= now - WINDOW_S:
            self._arrivals.popleft()
        self.counters["max_requests_in_any_60s_window"] = max(
            self.counters["max_requests_in_any_60s_window"], len(self._arrivals)
        )

    def _authorised(self, request: web.Request) -> bool:
        return self.config.api_key is None or request.headers.get("Authorization") == f"Bearer {self.config.api_key}"

    def _unauthorised(self, request: web.Request) -> web.Response:
        self.counters["auth_failures"] += 1
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        # Echo the key we got, as some providers do (in part): clients must not pass it on.
        return _error(401, "invalid_request_error", f"Incorrect API key provided: {given}")

    def _rate_limit(self, now: float, body: Mapping[str, Any]) -> web.Response | None:
        if self._storm.active(now):
            self._storm.take()
            return self._too_many(now, self._storm.retry_after_s, exact=False)
        estimate = _estimate(body)
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
        self._retry_until = max(self._retry_until, now + in_force)
        message = f"Rate limit reached for {self.config.model}. Please try again in {wait_s:.3f}s."
        return _error(429, "rate_limit_exceeded", message, headers)

    def _roll(self) -> str | None:
        draw = self._rng.random()
        for name in _RATES:
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
            return _error(504, "timeout", "upstream timed out")
        low, high = self.faults.latency_ms
        await asyncio.sleep(self._rng.uniform(low, high) / 1000)
        if fault == "error_rate":
            self.counters["errors_injected"] += 1
            return _error(self._rng.choice((500, 502, 503)), "server_error", "the stand-in failed on purpose")
        text, allowed = _question(body)
        if not allowed:
            self.counters["bad_requests"] += 1
            return _error(400, "invalid_request_error", "cannot tell which labels are allowed")
        if fault == "malformed_rate":
            self.counters["malformed_sent"] += 1
            return self._malformed(body)
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

    def _completion(self, body: Mapping[str, Any], label: str) -> web.Response:
        content = orjson.dumps({"label": label}).decode()
        usage = {
            "prompt_tokens": count_prompt_tokens(body["messages"]),
            "completion_tokens": count_tokens(content),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.counters["answered"] += 1
        self.counters["prompt_tokens"] += usage["prompt_tokens"]
        self.counters["completion_tokens"] += usage["completion_tokens"]
        log.debug("standin_answer", label=label, **usage)
        return _json(
            200,
            _chat_body(self.config.model, content, usage),
            self._limits.headers(time.monotonic(), self.faults),
        )

    def _malformed(self, body: Mapping[str, Any]) -> web.Response:
        kind = self._rng.choice(("not_json", "truncated", "no_usage"))
        if kind == "not_json":
            return web.Response(status=200, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        full = _chat_body(self.config.model, '{"label": "x"}', {"prompt_tokens": 1, "completion_tokens": 1})
        if kind == "no_usage":
            del full["usage"]
            return _json(200, full)
        raw = orjson.dumps(full)
        return web.Response(status=200, body=raw[: len(raw) // 2], content_type="application/json")


def _estimate(body: Mapping[str, Any]) -> int:
    limit = body.get("max_completion_tokens", body.get("max_tokens", 16))
    return count_prompt_tokens(body["messages"]) + (limit if isinstance(limit, int) else 16)


def _question(body: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
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


def _chat_body(model: str, content: str, usage: Mapping[str, int]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-standin-{random.getrandbits(48):012x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": dict(usage),
    }


async def _read_json(request: web.Request) -> dict[str, Any] | None:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _json(status: int, data: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json", headers=headers)


def _error(status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json(status, {"error": {"message": message, "type": kind, "code": kind}}, headers)


class StandinServer:
    """Runs the stand-in on a port. ``async with StandinServer(StandinConfig(...)) as url:`` gives the base
    URL for :class:`~consumer.config.LlmConfig` (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, config: StandinConfig | None = None, policy: Policy | None = None) -> None:
        self.app = StandinApp(config or StandinConfig(), policy)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def __repr__(self) -> str:
        return f"StandinServer(url={self.url!r})"

    async def __aenter__(self) -> str:
        config = self.app.config
        self._runner = web.AppRunner(
            self.app.web_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.host, config.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        self.url = f"http://{host}:{port}/v1"
        log.info("standin_listening", url=self.url, policy=config.policy)
        return self.url

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.app.closing.set()  # let held ("timed out") requests end now
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stats(self) -> dict[str, Any]:
        return self.app.stats()

    def control(self, **changes: Any) -> None:
        """Same as ``POST /control``: e.g. ``control(error_rate=0.3)`` or ``control(storm={"requests": 2})``."""
        self.app.control(changes)
