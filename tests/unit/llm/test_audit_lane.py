"""The pool's audit lane against the stand-in over real HTTP: shadow requests go last and never wait for room."""

from __future__ import annotations

import asyncio

from consumer.llm.pool import LlmPool
from consumer.records import LlmAnswer, LlmFailure, LlmOutcome
from consumer.sandbox.standin import Faults, StandinConfig, StandinServer
from tests.unit.llm.test_pool import eventually, llm_config, scored


async def test_queued_real_reviews_are_served_before_queued_audits() -> None:
    server = StandinServer(StandinConfig(faults=Faults(latency_ms=(40, 40))))
    order: list[str] = []

    async def ask(text: str, audit: bool) -> LlmOutcome:
        outcome = await pool.label(scored(text), prompt="plain" if audit else "s4l", audit=audit)
        order.append(text)
        return outcome

    async with server as url, LlmPool(llm_config(url, max_concurrency=1, queue_low_water=50)) as pool:
        first = asyncio.create_task(ask("real 0", False))
        await eventually(lambda: pool.backlog() == 1)
        audits = [asyncio.create_task(ask(f"audit {i}", True)) for i in range(3)]
        await eventually(lambda: pool.audit_backlog() == 3)
        reals = [asyncio.create_task(ask(f"real {i}", False)) for i in range(1, 4)]
        outcomes = await asyncio.gather(first, *audits, *reals)
    assert all(isinstance(o, LlmAnswer) for o in outcomes)
    assert order == ["real 0", "real 1", "real 2", "real 3", "audit 0", "audit 1", "audit 2"], order
    assert pool.stats().requests == 7 and pool.audit_backlog() == 0


async def test_an_audit_is_skipped_at_once_above_the_low_water_mark() -> None:
    server = StandinServer(StandinConfig(faults=Faults(latency_ms=(200, 200))))
    async with server as url, LlmPool(llm_config(url, max_concurrency=1, queue_low_water=2)) as pool:
        reals = [asyncio.create_task(pool.label(scored(f"real {i}"))) for i in range(4)]
        await eventually(lambda: pool.backlog() == 4)
        async with asyncio.timeout(0.1):  # it never waits
            skipped = await pool.label(scored("audit"), prompt="plain", audit=True)
        await asyncio.gather(*reals)
    assert isinstance(skipped, LlmFailure) and skipped.reason == "audit_skipped"
    assert server.stats()["requests"] == 4


async def test_shutdown_answers_waiting_audits() -> None:
    server = StandinServer(StandinConfig(faults=Faults(latency_ms=(300, 300))))
    async with server as url:
        pool = LlmPool(llm_config(url, max_concurrency=1, queue_low_water=50), drain_timeout_s=0.05)
        async with pool:
            tasks = [asyncio.create_task(pool.label(scored(f"a {i}"), audit=True)) for i in range(3)]
            await eventually(lambda: pool.audit_backlog() == 3)
        outcomes = await asyncio.gather(*tasks)
    assert all(isinstance(o, LlmFailure) and o.reason == "shutdown" for o in outcomes)
    assert pool.audit_backlog() == 0
