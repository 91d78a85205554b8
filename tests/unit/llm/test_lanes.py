"""The pool's queues: every job reaches one waiting worker, a put wakes one worker (not every idle one)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consumer.aio import cancel_and_wait
from consumer.llm.jobs import Job, Lanes
from consumer.llm.prompting import build_prompt

pytestmark = pytest.mark.timeout(30)


def job(n: int, *, audit: bool = False) -> Job:
    prompt = build_prompt(f"review {n}", {"negative": 0.4, "positive": 0.6}, "plain")
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    return Job(f"r{n}", f"review {n}", prompt, ("k", n), future, None, audit=audit)  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(5):  # let every woken waiter run (a few loop turns, no wall-clock wait)
        await asyncio.sleep(0)


async def test_one_put_wakes_one_of_many_idle_workers_and_every_job_is_taken_once() -> None:
    lanes = Lanes(100, 10, 2)
    looks = 0  # how often a worker looked at the queues: a worker woken for nothing looks in vain
    real_get_nowait = lanes.get_nowait

    def counting_get_nowait(audit_slots: int | None = None) -> Job:
        nonlocal looks
        looks += 1
        return real_get_nowait(audit_slots)

    lanes.get_nowait = counting_get_nowait  # type: ignore[method-assign]

    async def worker(got: list[str]) -> None:
        while True:
            got.append((await lanes.get()).review_id)

    got: list[str] = []
    workers = [asyncio.create_task(worker(got)) for _ in range(16)]
    await settle()
    looks = 0  # all 16 idle now
    await lanes.put(job(1))
    await settle()
    assert got == ["r1"]
    assert looks == 2  # the woken worker takes it, then looks once more before it waits again
    for n in range(2, 50):
        await lanes.put(job(n))
    await settle()
    assert sorted(got, key=lambda r: int(r[1:])) == [f"r{n}" for n in range(1, 50)]
    await cancel_and_wait(workers)


async def test_a_waiting_audit_goes_when_an_audit_slot_frees() -> None:
    lanes = Lanes(100, 10, 1)
    first, second = job(1, audit=True), job(2, audit=True)
    assert lanes.offer_audit(first) and lanes.offer_audit(second)
    taken = await lanes.get()
    waiting = asyncio.create_task(lanes.get())
    await settle()
    assert taken is first and not waiting.done()  # one audit slot, in use
    lanes.done(taken)
    assert await asyncio.wait_for(waiting, 5) is second


async def test_a_cancelled_waiter_passes_its_wake_on() -> None:
    lanes = Lanes(100, 10, 2)
    first = asyncio.create_task(lanes.get())
    second = asyncio.create_task(lanes.get())
    await settle()
    await lanes.put(job(1))  # wakes the first waiter ...
    first.cancel()  # ... which is cancelled before it runs
    assert (await asyncio.wait_for(second, 5)).review_id == "r1"
    await cancel_and_wait([first])
