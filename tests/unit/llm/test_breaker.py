"""The circuit breaker on a fake clock: open, half-open with one probe, close or reopen; every move logged."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from consumer.llm.breaker import CircuitBreaker
from consumer.llm.ratelimit import FakeClock

pytestmark = pytest.mark.timeout(10)


def state(breaker: CircuitBreaker) -> str:
    return breaker.state  # read through a function so mypy does not pin the property's value


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        ticket = breaker.try_acquire()
        assert ticket is not None
        ticket.failure()


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failures=3, reset_s=10.0, clock=FakeClock())
    fail(breaker, 2)
    ticket = breaker.try_acquire()
    assert ticket is not None
    ticket.success()  # resets the count
    fail(breaker, 2)
    assert state(breaker) == "closed"
    fail(breaker, 1)
    assert state(breaker) == "open"
    assert breaker.try_acquire() is None


def test_half_open_lets_one_probe_through_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, reset_s=10.0, clock=clock)
    fail(breaker, 1)
    clock.advance(9.9)
    assert breaker.try_acquire() is None
    clock.advance(0.1)
    probe = breaker.try_acquire()
    assert probe is not None and probe.probe
    assert state(breaker) == "half_open"
    assert breaker.try_acquire() is None  # one probe at a time
    probe.success()
    assert state(breaker) == "closed"
    assert breaker.try_acquire() is not None


def test_a_failed_probe_reopens_for_another_reset_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=2, reset_s=5.0, clock=clock)
    fail(breaker, 2)
    clock.advance(5.0)
    probe = breaker.try_acquire()
    assert probe is not None
    probe.failure()
    assert state(breaker) == "open"
    clock.advance(4.0)
    assert breaker.try_acquire() is None
    clock.advance(1.0)
    assert breaker.try_acquire() is not None


def test_a_released_probe_lets_the_next_one_go() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, reset_s=1.0, clock=clock)
    fail(breaker, 1)
    clock.advance(1.0)
    probe = breaker.try_acquire()
    assert probe is not None
    probe.release()  # e.g. cancelled or throttled: says nothing about health
    assert state(breaker) == "half_open"
    assert breaker.try_acquire() is not None


def test_late_answers_from_before_a_transition_are_ignored() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=2, reset_s=1.0, clock=clock)
    early = [breaker.try_acquire() for _ in range(3)]
    assert all(t is not None for t in early)
    early[0].failure()  # type: ignore[union-attr]
    early[1].failure()  # type: ignore[union-attr]
    assert state(breaker) == "open"
    early[2].success()  # type: ignore[union-attr]  # sent while closed: must not close it
    assert state(breaker) == "open"
    clock.advance(1.0)
    probe = breaker.try_acquire()
    assert probe is not None
    probe.success()
    probe.failure()  # a second verdict on one ticket is ignored
    assert state(breaker) == "closed"


def test_every_transition_is_logged_and_counted() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, reset_s=1.0, clock=clock)
    with capture_logs() as logs:
        fail(breaker, 1)
        clock.advance(1.0)
        probe = breaker.try_acquire()
        assert probe is not None
        probe.failure()
        clock.advance(1.0)
        probe = breaker.try_acquire()
        assert probe is not None
        probe.success()
    moves = [(e["from_state"], e["to_state"]) for e in logs if e["event"] == "breaker_transition"]
    assert moves == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert breaker.transition_count == 5
    assert breaker.transitions[("open", "half_open")] == 2


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0, reset_s=1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(failures=1, reset_s=0.0)


def test_a_trip_opens_at_once_whatever_the_count_and_a_late_trip_still_counts() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=5, reset_s=10.0, clock=clock)
    late = breaker.try_acquire()
    ticket = breaker.try_acquire()
    assert ticket is not None and late is not None
    ticket.trip()  # 401/403: one is enough
    assert state(breaker) == "open" and breaker.try_acquire() is None
    clock.advance(10.0)
    probe = breaker.try_acquire()
    assert probe is not None and state(breaker) == "half_open"
    late.trip()  # an answer from before the transition: a bad key is bad whenever it is heard
    assert state(breaker) == "open"


def test_the_policy_tells_the_breaker_what_each_failure_means() -> None:
    from consumer.errors import RateLimitedError, TransientLlmError, breaker_effect, llm_http_error
    from consumer.llm.client import InvalidAnswerError, MalformedResponseError
    from consumer.llm.ratelimit import RequestTooLargeError

    effects = {status: breaker_effect(llm_http_error(status, "x")) for status in (400, 401, 403, 404, 408, 409)}
    effects |= {status: breaker_effect(llm_http_error(status, "x")) for status in (413, 422, 429, 500, 503)}
    assert effects == {
        400: "neutral", 404: "neutral", 413: "neutral", 422: "neutral", 429: "neutral",
        401: "misconfigured", 403: "misconfigured",
        408: "failing", 409: "failing", 500: "failing", 503: "failing",
    }  # fmt: skip
    assert llm_http_error(200, "ok") is None
    assert isinstance(llm_http_error(429, "x", 3.0), RateLimitedError)
    assert isinstance(llm_http_error(502, "x"), TransientLlmError)
    assert breaker_effect(InvalidAnswerError("bad")) == "healthy"
    assert breaker_effect(MalformedResponseError("bad")) == "failing"
    assert breaker_effect(RequestTooLargeError("big")) == "neutral"
    assert breaker_effect(ValueError("a bug")) == "neutral"
