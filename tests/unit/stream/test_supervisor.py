"""Supervision: the first failure stops the service once, a part that ends early is a failure, what ends after
close() is not, and /healthz says 503 from the first failure on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import pytest

from consumer.errors import FatalError
from consumer.observe.http import AdminServer
from consumer.observe.meter import Meter
from consumer.observe.probe import Probe, ServiceInfo
from consumer.stream.supervisor import Supervisor
from tests.unit.observe.fakes import DEFAULT_COMPLETION, PRICE, FakePipeline, FakePool, FakeSink, make_settings


async def test_a_task_that_raises_is_the_one_failure(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor()

    async def boom() -> None:
        raise RuntimeError("bug")

    supervisor.watch_errors(asyncio.create_task(boom()), "score-loop")
    await asyncio.wait_for(supervisor.failed.wait(), 5)
    supervisor.fail(FatalError("later", "ignored"))
    assert supervisor.failure is not None and supervisor.failure.what == "score-loop"
    assert "RuntimeError: bug" in supervisor.failure.detail
    assert not supervisor.healthy()


async def test_a_part_that_ends_before_shutdown_fails_and_one_cancelled_after_close_does_not() -> None:
    early, late = Supervisor(), Supervisor()

    async def done() -> None:
        return None

    early.watch(asyncio.create_task(done()), "metrics-emitter")
    await asyncio.wait_for(early.failed.wait(), 5)
    assert early.failure is not None and early.failure.detail == "the task ended"
    forever = asyncio.create_task(asyncio.Event().wait())
    late.watch(forever, "llm-worker-0")
    await late.close()
    forever.cancel()
    await asyncio.gather(forever, return_exceptions=True)
    assert late.healthy()


async def test_an_event_from_a_part_that_logs_its_own_fatal() -> None:
    supervisor, event = Supervisor(), asyncio.Event()
    supervisor.watch_event(event, lambda: FatalError("reviews.labeled", "UNKNOWN_TOPIC_OR_PART"), "sink")
    event.set()
    await asyncio.wait_for(supervisor.failed.wait(), 5)
    assert supervisor.failure is not None and supervisor.failure.what == "reviews.labeled"
    await supervisor.close()


@dataclass
class _SupervisedPipeline(FakePipeline):
    supervisor: Supervisor = field(default_factory=Supervisor)

    def healthy(self) -> bool:
        return self.supervisor.healthy()


async def test_healthz_fails_once_the_service_is_stopping_on_a_failure() -> None:
    pipeline = _SupervisedPipeline()
    probe = Probe(
        ServiceInfo.from_settings(make_settings()), Meter(PRICE, DEFAULT_COMPLETION), pipeline, FakePool(),
        FakeSink(), model_version=lambda: "m-1",
    )  # fmt: skip
    async with AdminServer(probe, "127.0.0.1", 0, 30.0) as admin, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{admin.port}/healthz"
        async with session.get(url) as response:
            assert response.status == 200
        pipeline.supervisor.fail(FatalError("score-loop", "RuntimeError: bug"))
        async with session.get(url) as response:
            assert (response.status, await response.json()) == (503, {"status": "failing"})
