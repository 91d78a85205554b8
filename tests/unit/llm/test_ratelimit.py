"""The rate limiter on a fake clock: never over RPM/TPM in any rolling window, nearly all of it used."""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.llm.ratelimit import (
    DEFAULT_MARGIN_S,
    REQUEST_TOLERANCE_S,
    WINDOW_S,
    FakeClock,
    MonotonicClock,
    RateLimiter,
    RequestTooLargeError,
    RollingWindow,
)

pytestmark = pytest.mark.timeout(30)


async def eventually(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Wait for a condition (yielding to the loop between looks), failing after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0)


def max_in_window(times: list[float], amounts: list[int], window_s: float = WINDOW_S) -> int:
    """The largest sum of amounts whose times fall in any half-open window (t - window_s, t]."""
    best = 0
    for i, end in enumerate(times):
        start = bisect.bisect_right(times, end - window_s)
        best = max(best, sum(amounts[start : i + 1]))
    return best


async def saturate(limiter: RateLimiter, clock: FakeClock, n: int, tokens: int = 1) -> list[float]:
    admitted = []
    for _ in range(n):
        async with limiter.acquire(tokens) as permit:
            admitted.append(clock.now())
            permit.reconcile(tokens)
    return admitted


async def test_saturation_uses_at_least_95_percent_and_never_exceeds_rpm() -> None:
    clock = FakeClock(autojump=True)
    limiter = RateLimiter(rpm=600, tpm=10_000_000, max_concurrency=8, clock=clock)
    admitted = await saturate(limiter, clock, 6000)  # ten minutes' worth
    assert max_in_window(admitted, [1] * len(admitted)) <= 600
    minutes = admitted[-1] / 60.0
    assert len(admitted) / minutes >= 0.95 * 600
    in_first_minute = sum(1 for t in admitted if t < 60.0)
    assert 0.95 * 600 <= in_first_minute <= 600


async def test_pacing_spreads_requests_evenly_without_a_burst_at_the_start() -> None:
    clock = FakeClock(autojump=True)
    limiter = RateLimiter(rpm=120, tpm=10_000_000, max_concurrency=4, clock=clock)
    admitted = await saturate(limiter, clock, 10)
    interval = (WINDOW_S + DEFAULT_MARGIN_S) / 120
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(admitted)]
    # The schedule may be met up to REQUEST_TOLERANCE_S early, once; after that it runs on the beat.
    assert gaps[0] == round(interval - REQUEST_TOLERANCE_S, 6)
    assert set(gaps[1:]) == {round(interval, 6)}


class LateClock(FakeClock):
    """Every timer fires 2 ms late, as real event loops do under load."""

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + 0.002)


async def test_late_wake_ups_do_not_push_the_schedule_back() -> None:
    clock = LateClock(autojump=True)
    limiter = RateLimiter(rpm=600, tpm=10_000_000, max_concurrency=4, clock=clock)
    admitted = await saturate(limiter, clock, 600)
    interval = (WINDOW_S + DEFAULT_MARGIN_S) / 600
    assert admitted[-1] <= 599 * interval + 0.01  # 2 ms lateness x 600 would have cost 1.2 s
    assert max_in_window(admitted, [1] * len(admitted)) <= 600


async def test_one_long_review_does_not_slow_the_request_rate() -> None:
    clock = FakeClock(autojump=True)
    limiter = RateLimiter(rpm=600, tpm=1_000_000, max_concurrency=4, clock=clock)
    times = []
    for tokens in (200, 2_000, 200, 200):  # 2,000 tokens take 0.12 s of the token schedule: > one interval
        async with limiter.acquire(tokens):
            times.append(clock.now())
    assert times[-1] - times[1] == pytest.approx(2 * (WINDOW_S + DEFAULT_MARGIN_S) / 600)


@settings(max_examples=60, deadline=None)
@given(
    rpm=st.integers(1, 60),
    tpm=st.integers(200, 3000),
    steps=st.lists(
        st.tuples(
            st.integers(1, 200),  # estimated tokens
            st.floats(0.0, 1.0),  # actual / estimate
            st.floats(0.0, 20.0),  # idle time before the next request
            st.sampled_from([None, None, None, 0.25, 0.5, 1.0]),  # set_share before it
        ),
        min_size=1,
        max_size=120,
    ),
)
def test_never_exceeds_rpm_or_tpm_in_any_rolling_window(
    rpm: int, tpm: int, steps: list[tuple[int, float, float, float | None]]
) -> None:
    times, actuals, limits = asyncio.run(_drive(rpm, tpm, steps))
    for i, end in enumerate(times):
        start = bisect.bisect_right(times, end - WINDOW_S)
        request_limit, token_limit = limits[i]
        assert i + 1 - start <= request_limit
        # Each estimate fits the limit in force, so the real tokens in any window fit it too.
        assert sum(actuals[start : i + 1]) <= token_limit


async def _drive(
    rpm: int, tpm: int, steps: list[tuple[int, float, float, float | None]]
) -> tuple[list[float], list[int], list[tuple[int, int]]]:
    clock = FakeClock(autojump=True)
    limiter = RateLimiter(rpm=rpm, tpm=tpm, max_concurrency=4, clock=clock)
    times: list[float] = []
    actuals: list[int] = []
    limits: list[tuple[int, int]] = []
    for wanted, ratio, idle, share in steps:
        if share is not None:
            limiter.set_share(share)
        await clock.sleep(idle)
        estimate = min(wanted, limiter.tpm)
        async with limiter.acquire(estimate) as permit:
            times.append(clock.now())
            actual = int(estimate * ratio)
            permit.reconcile(actual)
        actuals.append(actual)
        limits.append((limiter.rpm, limiter.tpm))
    return times, actuals, limits


async def test_tpm_binds_and_is_never_exceeded() -> None:
    clock = FakeClock(autojump=True)
    limiter = RateLimiter(rpm=10_000, tpm=1_000, max_concurrency=4, clock=clock)
    admitted = await saturate(limiter, clock, 100, tokens=100)
    assert max_in_window(admitted, [100] * len(admitted)) <= 1_000
    assert len([t for t in admitted if t < 5 * 60]) >= 0.95 * 5 * 10  # ~10 requests/minute of 100 tokens


async def test_reconciled_usage_frees_the_unused_estimate() -> None:
    clock = FakeClock(autojump=True)
    limiter = RateLimiter(rpm=10_000, tpm=1_000, max_concurrency=4, clock=clock)
    times = []
    for _ in range(3):
        async with limiter.acquire(500) as permit:
            times.append(clock.now())
            permit.reconcile(100)
    # Charged at the estimate, the third request would have had to wait for the first to leave the window.
    assert times[2] < 30.0
    assert limiter.tokens_in_window() == 100 + 100 + 100


async def test_usage_above_the_estimate_delays_later_requests() -> None:
    clock = FakeClock(autojump=True)
    limiter = RateLimiter(rpm=10_000, tpm=1_000, max_concurrency=4, clock=clock)
    async with limiter.acquire(100) as permit:
        permit.reconcile(900)
    async with limiter.acquire(200):
        assert clock.now() >= WINDOW_S  # 900 + 200 > 1000: wait until the first leaves the window


async def test_a_pause_holds_back_every_waiting_caller() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=6_000, tpm=1_000_000, max_concurrency=8, clock=clock)
    limiter.pause_for(2.0)
    admitted: list[float] = []

    async def one() -> None:
        async with limiter.acquire(10):
            admitted.append(clock.now())

    tasks = [asyncio.create_task(one()) for _ in range(3)]
    await eventually(lambda: clock.sleepers == 1)  # the first in line waits for the pause; the rest queue
    clock.advance(1.0)
    limiter.pause_for(3.0)  # a second 429 arrives meanwhile: the pause now ends at 4.0
    clock.advance(1.0)
    await eventually(lambda: clock.sleepers == 1)
    assert admitted == []
    while len(admitted) < 3:  # then they go one pacing interval apart
        clock.advance(0.5)
        await eventually(lambda: clock.sleepers == 1 or len(admitted) == 3)
    await asyncio.gather(*tasks)
    assert min(admitted) >= 4.0


async def test_pauses_only_extend() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=1000, max_concurrency=1, clock=clock)
    assert limiter.pause_for(5.0) == 5.0
    assert limiter.pause_for(1.0) == 5.0


async def test_concurrency_is_bounded() -> None:
    clock = FakeClock(autojump=True)
    limiter = RateLimiter(rpm=60_000, tpm=10_000_000, max_concurrency=2, clock=clock)
    release = asyncio.Event()
    peak = 0

    async def hold() -> None:
        nonlocal peak
        async with limiter.acquire(1):
            peak = max(peak, limiter.in_flight)
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(5)]
    await eventually(lambda: limiter.in_flight == 2)
    assert limiter.admitted == 2
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 2 and limiter.admitted == 5


async def test_set_share_scales_both_limits_down() -> None:
    clock = FakeClock(autojump=True)
    limiter = RateLimiter(rpm=100, tpm=10_000, max_concurrency=4, clock=clock)
    limiter.set_share(1 / 3)
    assert (limiter.rpm, limiter.tpm) == (33, 3333)
    admitted = await saturate(limiter, clock, 100)
    assert max_in_window(admitted, [1] * len(admitted)) <= 33
    with pytest.raises(ValueError):
        limiter.set_share(0.0)


async def test_a_request_larger_than_the_whole_tpm_is_refused() -> None:
    limiter = RateLimiter(rpm=10, tpm=100, max_concurrency=1, clock=FakeClock())
    with pytest.raises(RequestTooLargeError):
        async with limiter.acquire(101):
            pass


def test_rolling_window_expires_and_reports_when_room_comes() -> None:
    window = RollingWindow(10.0)
    window.add(0.0, 3)
    window.add(4.0, 3)
    assert window.ready_at(5.0, 4, limit=8) == 10.0  # the first entry must leave
    assert window.ready_at(5.0, 7, limit=8) == 14.0  # both must leave
    assert window.total(10.0) == 3
    assert window.ready_at(10.0, 5, limit=8) == 10.0


async def test_real_clock_sleeps() -> None:
    clock = MonotonicClock()
    start = clock.now()
    await clock.sleep(0.01)
    assert clock.now() - start >= 0.009


BIG = 22_600  # a 90 KB review: ~22,500 prompt tokens plus the completion cap


@pytest.mark.parametrize("share", [1.0, 1 / 2])
async def test_a_long_review_within_the_share_goes_at_once(share: float) -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=200_000, max_concurrency=4, clock=clock)
    limiter.set_share(share)
    assert limiter.fits(BIG)
    async with asyncio.timeout(1), limiter.acquire(BIG):
        assert clock.now() == 0.0


async def test_a_review_over_a_twelfth_share_waits_for_a_window_of_its_own_and_never_raises() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=200_000, max_concurrency=4, clock=clock)
    limiter.set_share(1 / 12)  # 16,666 tokens/min: the review is bigger than the whole share
    assert limiter.tpm < BIG and limiter.fits(BIG)
    async with limiter.acquire(1_000) as permit:  # something is already in the window
        permit.reconcile(1_000)
    admitted: list[tuple[str, float]] = []

    async def one(name: str, tokens: int) -> None:
        async with limiter.acquire(tokens):
            admitted.append((name, clock.now()))

    big = asyncio.create_task(one("big", BIG))
    await eventually(lambda: clock.sleepers == 1)
    small = asyncio.create_task(one("small", 100))
    await eventually(lambda: limiter.waiting == 2)
    assert admitted == []
    limiter.pause_for(1.0)  # nothing is held while the head of the line sleeps: the pool's calls go through
    limiter.set_share(1 / 12)
    span = WINDOW_S + DEFAULT_MARGIN_S
    while not admitted:
        clock.advance(1.0)
        await eventually(lambda: clock.sleepers >= 1 or bool(admitted))
    assert admitted[0][0] == "big" and span <= admitted[0][1] <= span + 1  # once the window emptied: alone in it
    while len(admitted) < 2:
        clock.advance(1.0)
        await eventually(lambda: clock.sleepers >= 1 or len(admitted) == 2)
    await asyncio.gather(big, small)
    assert admitted[1][0] == "small" and admitted[1][1] >= 2 * span  # the window was the big one's own


async def test_cancelling_the_sleeping_head_of_the_line_lets_the_next_one_go() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=200_000, max_concurrency=4, clock=clock)
    limiter.set_share(1 / 12)
    async with limiter.acquire(16_000):
        pass
    big = asyncio.create_task(limiter.acquire(BIG).__aenter__())
    await eventually(lambda: clock.sleepers == 1)
    small_done = asyncio.Event()

    async def small() -> None:
        async with limiter.acquire(100):
            small_done.set()

    waiter = asyncio.create_task(small())
    await eventually(lambda: limiter.waiting == 2)
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    clock.advance(WINDOW_S + DEFAULT_MARGIN_S)  # the 16,000 of the first request leave the window
    async with asyncio.timeout(2):
        await small_done.wait()
    await waiter
    assert limiter.waiting == 0


def test_a_request_over_the_whole_tpm_can_never_fit() -> None:
    limiter = RateLimiter(rpm=600, tpm=20_000, max_concurrency=4, clock=FakeClock())
    assert not limiter.fits(BIG) and limiter.fits(20_000)


def test_rolling_window_lets_an_oversized_amount_into_an_empty_window() -> None:
    window = RollingWindow(10.0)
    assert window.ready_at(0.0, 50, limit=8) == 0.0  # was an IndexError
    window.add(0.0, 3)
    assert window.ready_at(5.0, 50, limit=8) == 10.0
