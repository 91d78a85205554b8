"""The LLM pool under a hostile provider and hostile input, over real HTTP (issue 15).

The stand-in is used wherever it can produce the case (429 storms, a wrong key, review ids, usage, latency).
A tiny aiohttp provider in this file answers what the stand-in cannot: 400 for a marked review, 403.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from consumer.llm.pool import LlmPool
from consumer.llm.prompting import parse_payload
from consumer.llm.ratelimit import FakeClock
from consumer.records import LlmAnswer, LlmFailure
from consumer.sandbox.standin import Faults, StandinConfig, StandinServer
from tests.unit.llm.test_pool import eventually, llm_config, scored

pytestmark = pytest.mark.timeout(30)


@dataclass
class Provider:
    """A provider that answers 400 for reviews containing POISON and ``status`` (if set) for everything."""

    status: int | None = None
    storm: int = 0  # hold this many requests, then answer them all 429 with Retry-After: retry_after
    retry_after: str = "86400"
    received: list[str] = field(default_factory=list)
    answered: int = 0
    _held: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        payload = parse_payload(body["messages"])
        self.received.append(payload.review)
        if len(self.received) <= self.storm:
            if len(self.received) == self.storm:
                self._held.set()
            await self._held.wait()  # every 429 of the storm arrives while the first one's pause holds
            return web.json_response(
                {"error": {"message": "slow down"}}, status=429, headers={"Retry-After": self.retry_after}
            )
        self.answered += 1
        if self.status is not None:
            return web.json_response({"error": {"message": "forbidden"}}, status=self.status)
        if "POISON" in payload.review:
            return web.json_response({"error": {"message": "content filter", "code": "content_filter"}}, status=400)
        content = orjson.dumps({"label": payload.allowed_labels[0]}).decode()
        return web.json_response(
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 40, "completion_tokens": 5},
            }
        )


@pytest.fixture
async def provider() -> AsyncIterator[tuple[Provider, str]]:
    fake = Provider()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        yield fake, str(server.make_url("/v1"))


# --- provider hints are bounded ----------------------------------------------------------------------------


async def run_clock_until(clock: FakeClock, condition: Callable[[], bool], step_s: float, limit_s: float) -> None:
    """Move the fake clock in steps (letting the loop run between them) until ``condition`` holds."""
    async with asyncio.timeout(10):
        while not condition():
            assert clock.now() < limit_s, f"still waiting at t={clock.now()}"
            clock.advance(step_s)
            await asyncio.sleep(0.002)


async def test_429_retry_after_a_day_then_healthy_leaves_within_the_cap() -> None:
    clock = FakeClock()
    server = StandinServer(StandinConfig())
    async with server as url, LlmPool(llm_config(url, max_retry_after_s=60), clock) as pool:
        server.control(storm={"requests": 1, "retry_after_s": 86400})
        task = asyncio.create_task(pool.label(scored("one review")))
        await eventually(lambda: pool.stats().rate_limited == 1)
        await run_clock_until(clock, lambda: server.stats()["answered"] == 1, 0.5, 120.0)
        left_at = clock.now()
        outcome = await task
    assert isinstance(outcome, LlmAnswer) and server.stats()["rate_limited_sent"] == 1
    assert 59.5 <= left_at <= 60.5, left_at  # the retry left within the cap, not a day later


async def test_a_capped_retry_after_is_logged_once_per_pause_with_the_value_seen(
    provider: tuple[Provider, str],
) -> None:
    fake, url = provider
    fake.storm = 3
    clock = FakeClock()
    async with LlmPool(llm_config(url, max_retry_after_s=60), clock) as pool:
        with capture_logs() as logs:
            tasks = [asyncio.create_task(pool.label(scored(f"review {i}"))) for i in range(3)]
            await run_clock_until(clock, lambda: pool.stats().rate_limited == 3, 0.001, 1.0)
            await run_clock_until(clock, lambda: fake.answered == 3, 0.5, 120.0)
            left_at = clock.now()
            outcomes = await asyncio.gather(*tasks)
    assert all(isinstance(o, LlmAnswer) for o in outcomes) and left_at <= 62  # all three within the cap
    capped = [e for e in logs if e["event"] == "llm_retry_after_capped"]
    assert len(capped) == 1 and capped[0]["seen_s"] == 86400 and capped[0]["cap_s"] == 60


# --- one failure policy -------------------------------------------------------------------------------------


async def test_five_rejected_reviews_fall_back_alone_and_never_open_the_breaker(
    provider: tuple[Provider, str],
) -> None:
    fake, url = provider
    async with LlmPool(llm_config(url, breaker_failures=5)) as pool:
        poisoned = [await pool.label(scored(f"POISON {i}")) for i in range(5)]
        good = await pool.label(scored("A good kettle."))
        stats = pool.stats()
    assert all(isinstance(o, LlmFailure) and o.reason == "request_rejected" for o in poisoned)
    assert all(isinstance(o, LlmFailure) and o.attempts == 1 for o in poisoned)  # never retried
    assert isinstance(good, LlmAnswer)  # labeled by the LLM
    assert stats.breaker_state == "closed" and stats.breaker_transitions == 0 and not stats.auth_failed
    assert len(fake.received) == 6


async def test_a_wrong_key_opens_the_breaker_fails_readiness_and_says_so_once() -> None:
    server = StandinServer(StandinConfig(api_key="sk-right-key-0001"))
    async with server as url, LlmPool(llm_config(url, api_key="sk-wrong-key-0002", breaker_reset_s=60)) as pool:
        with capture_logs() as logs:
            outcomes = [await pool.label(scored(f"review {i}")) for i in range(4)]
        stats = pool.stats()
    assert [o.reason for o in outcomes if isinstance(o, LlmFailure)] == ["request_rejected"] + ["circuit_open"] * 3
    assert stats.breaker_state == "open" and stats.auth_failed and pool.auth_failed
    assert server.stats()["auth_failures"] == 1  # one 401, then the open breaker spared the provider
    assert [e["event"] for e in logs].count("llm_auth_failed") == 1


async def test_403_is_misconfiguration_too_and_an_answer_clears_it(provider: tuple[Provider, str]) -> None:
    fake, url = provider
    fake.status = 403
    clock = FakeClock()
    async with LlmPool(llm_config(url, breaker_reset_s=5), clock) as pool:
        with capture_logs() as logs:
            first = await pool.label(scored("one"))
            second = await pool.label(scored("two"))
        assert pool.stats().auth_failed and pool.stats().breaker_state == "open"
        fake.status = None  # the key was fixed (a new Secret mounted, the provider restored access)
        clock.advance(5)
        third = await pool.label(scored("three"))
        stats = pool.stats()
    assert isinstance(first, LlmFailure) and isinstance(second, LlmFailure) and second.reason == "circuit_open"
    assert isinstance(third, LlmAnswer) and stats.breaker_state == "closed" and not stats.auth_failed
    assert [e["event"] for e in logs].count("llm_auth_failed") == 1


# --- hostile input ------------------------------------------------------------------------------------------


async def test_a_review_id_with_a_newline_reaches_the_provider() -> None:
    server = StandinServer(StandinConfig())
    async with server as url, LlmPool(llm_config(url)) as pool:
        outcome = await pool.label(scored("Fine toaster.", review_id="a\nb"))
    seen = server.stats()
    assert isinstance(outcome, LlmAnswer), outcome
    assert seen["requests"] == 1 and seen["answered"] == 1 and len(seen["recent_requests"]) == 1


async def test_a_response_over_max_response_bytes_is_malformed() -> None:
    server = StandinServer(StandinConfig())
    async with server as url, LlmPool(llm_config(url, max_response_bytes=64)) as pool:
        outcome = await pool.label(scored("Fine toaster."))
    assert isinstance(outcome, LlmFailure) and outcome.reason == "malformed_response"
    assert "64 bytes" in outcome.detail


async def test_a_review_that_can_never_fit_the_tpm_falls_back_at_once() -> None:
    server = StandinServer(StandinConfig())
    async with server as url, LlmPool(llm_config(url, tpm=20_000)) as pool:
        outcome = await pool.label(scored("word " * 18_000))  # 90 KB: about 22,500 tokens
        stats = pool.stats()
    assert isinstance(outcome, LlmFailure) and outcome.reason == "too_large_for_tpm"
    assert server.stats()["requests"] == 0 and stats.requests == 0 and stats.breaker_state == "closed"


# --- single flight and byte budgets -------------------------------------------------------------------------


async def test_identical_reviews_in_flight_at_once_share_one_request() -> None:
    server = StandinServer(StandinConfig(faults=Faults(latency_ms=(100, 100))))
    async with server as url, LlmPool(llm_config(url)) as pool:
        first, second = await asyncio.gather(
            pool.label(scored("Same words.", review_id="r1")), pool.label(scored("same  words. ", review_id="r2"))
        )
        stats = pool.stats()
    assert isinstance(first, LlmAnswer) and isinstance(second, LlmAnswer) and first.label == second.label
    assert server.stats()["requests"] == 1 and stats.requests == 1 and stats.shared == 1
    assert sorted([first.cost_usd > 0, second.cost_usd > 0]) == [False, True]  # paid for once
    assert stats.cost_usd == pytest.approx(max(first.cost_usd, second.cost_usd))


async def test_the_backlog_is_bounded_in_bytes_not_only_in_reviews() -> None:
    server = StandinServer(StandinConfig(faults=Faults(latency_ms=(300, 300))))
    text = "x" * 10_000
    size = len(text) * 2 + 2_000  # the job's bytes: the text and the prompt that embeds it (under ~1 KB more)
    async with (
        server as url,
        LlmPool(llm_config(url, max_concurrency=2, max_queue_bytes=4 * size, read_timeout_s=5)) as pool,
    ):
        tasks = [asyncio.create_task(pool.label(scored(f"{i} {text}"))) for i in range(12)]
        await eventually(lambda: pool.stats().requests >= 2)
        peak = pool.backlog_bytes()
        backlog = pool.backlog()
        outcomes = await asyncio.gather(*tasks)
    assert all(isinstance(o, LlmAnswer) for o in outcomes)
    assert 0 < peak <= 4 * size and backlog <= 4  # 12 callers, but at most 4 reviews' bytes held by the pool
    assert pool.backlog_bytes() == 0


def test_a_full_cache_of_long_reviews_holds_digests_not_texts() -> None:
    from consumer.llm.cache import LlmCache, cache_key

    cache = LlmCache(10_000, max_bytes=200_000)
    answer = LlmAnswer("positive", "standin", 10, 2, 0.001, 5.0, "s4l-v1")
    for i in range(1_000):
        cache.put(cache_key(f"{i} " + "y" * 90_000, "s4l-v1", "standin", ("negative", "positive")), answer)
    assert cache.bytes <= 200_000 and 0 < len(cache) < 1_000  # bounded by bytes before the count
    assert len(repr(cache_key("y" * 90_000, "s4l-v1", "m", ("a", "b")))) < 200


def test_the_retry_budget_holds_only_its_last_window() -> None:
    from consumer.llm.pool import RetryBudget

    clock = FakeClock()
    budget = RetryBudget(0.2, 5, clock)
    for _ in range(100_000):  # healthy: first attempts only, 10/s for 10,000 s
        budget.record_first()
        clock.advance(0.1)
    assert budget.held() <= 62  # one bucket per second of the 60 s window, not 100,000 timestamps
    assert 590 <= budget.firsts_in_window() <= 610
    assert budget.can_retry()


async def test_readiness_fails_while_the_provider_refuses_our_key() -> None:
    from consumer.observe.http import readiness
    from consumer.observe.meter import Meter
    from consumer.observe.probe import Probe, ServiceInfo
    from tests.unit.observe.fakes import DEFAULT_COMPLETION, PRICE, FakePipeline, FakeSink, make_settings

    server = StandinServer(StandinConfig(api_key="sk-right-key-0001"))
    async with server as url, LlmPool(llm_config(url, api_key="sk-wrong-key-0002")) as pool:
        pipeline = FakePipeline()
        pipeline.source.assigned = [("reviews", 0)]
        info = ServiceInfo.from_settings(make_settings())
        probe = Probe(info, Meter(PRICE, DEFAULT_COMPLETION), pipeline, pool, FakeSink(), model_version=lambda: "m")
        before = readiness(probe, 30.0)
        await pool.label(scored("any review"))
        after = readiness(probe, 30.0)
    assert before["ready"] and before["checks"]["llm"] == {"ok": True}
    assert not after["ready"] and after["missing"] == ["llm"]
