"""The closed loop's parts on a fake clock: audit sampling, agreement, the drift alarm, the adaptive
threshold and the spend cap."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from consumer.stream.control import AdaptiveThreshold, Agreement, AuditSample, AuditSampler, DriftAlarm, SpendCap


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_audit_sampling_is_seeded_by_review_id_and_hits_its_rate() -> None:
    sampler = AuditSampler(0.05, seed=7)
    ids = [f"r-{i}" for i in range(40_000)]
    chosen = [i for i in ids if sampler.chosen(i)]
    assert 0.045 <= len(chosen) / len(ids) <= 0.055
    assert chosen == [i for i in ids if AuditSampler(0.05, seed=7).chosen(i)]  # same on every instance
    assert chosen != [i for i in ids if AuditSampler(0.05, seed=8).chosen(i)]
    assert not any(AuditSampler(0.0, seed=7).chosen(i) for i in ids[:1000])
    assert AuditSampler(0.5, seed=1).chosen("a\ud800b") in (True, False)  # any string, even a lone surrogate


def test_agreement_keeps_windows_and_totals() -> None:
    agreement = Agreement()
    for i in range(100):
        agreement.add(i % 10 != 0)
    window = agreement.window()
    assert (window.k, window.n, window.estimate) == (90, 100, 0.9) and window.low < 0.9 < window.high
    agreement.roll()
    agreement.add(True)
    assert agreement.window().n == 1 and agreement.cumulative().n == 101


def test_the_drift_alarm_fires_once_when_agreement_surely_drops_and_clears_with_hysteresis() -> None:
    alarm = DriftAlarm(min_agreement=0.9, window=200)
    rng = random.Random(5)
    events = [alarm.update(rng.random() < 0.97) for _ in range(400)]
    assert True not in events and not alarm.firing
    fired_at = None
    for i in range(400):
        if alarm.update(rng.random() < 0.6) is True:
            fired_at = i
            break
    predicted = alarm.expected_delay(0.97, 0.6)
    assert predicted is not None and fired_at is not None and alarm.firing
    assert abs(fired_at + 1 - predicted) <= 25, (fired_at, predicted)  # within sampling noise of the prediction
    assert all(alarm.update(rng.random() < 0.6) is None for _ in range(100))  # fires once, stays on
    cleared = [alarm.update(rng.random() < 0.99) for _ in range(400)]
    assert cleared.count(False) == 1 and not alarm.firing


def test_the_adaptive_threshold_moves_in_bounded_steps_towards_the_risk_rule() -> None:
    control = AdaptiveThreshold(0.7, max_error=0.03, risk_confidence=0.95, window=2000, every=50, step=0.02)
    rng = random.Random(11)
    moves = []
    for _ in range(3000):
        conf = 0.5 + 0.5 * rng.random()
        move = control.add(AuditSample(conf, rng.random() < 0.85))  # 15% disagreement everywhere
        if move is not None:
            moves.append(move)
    assert moves and all(abs(m.new - m.old) <= 0.02 + 1e-9 for m in moves)
    assert all(m.reason == "risk_up" for m in moves) and control.tau == 0.999  # nothing certifies: the ceiling


@given(st.lists(st.tuples(st.floats(0.0, 30.0), st.floats(0.0001, 0.01)), min_size=1, max_size=300))
def test_spend_in_any_window_is_at_most_the_allowance_plus_one_request(steps: list[tuple[float, float]]) -> None:
    clock = FakeClock()
    cap = SpendCap(usd_per_hour=1.0, window_s=60.0, clock=clock)  # allowance: 1/60 dollar a minute
    admitted: list[tuple[float, float]] = []
    for gap, price in steps:
        clock.now += gap
        if cap.admit(price):
            admitted.append((clock.now, price))
    for start, _ in admitted:
        inside = sum(p for t, p in admitted if start <= t < start + 60.0)
        assert inside <= cap.allowance + 0.01 + 1e-12


def test_a_billed_price_above_the_estimate_is_counted_against_the_window() -> None:
    clock = FakeClock()
    cap = SpendCap(usd_per_hour=3.6, window_s=10.0, clock=clock)  # 0.01 per 10 s
    assert cap.admit(0.004)
    cap.correct(0.004, 0.012)
    assert not cap.admit(0.001) and cap.pressure() > 1
    clock.now += 10.0
    assert cap.admit(0.001)


def test_with_few_samples_the_adaptive_threshold_holds_until_they_refute_it() -> None:
    control = AdaptiveThreshold(0.9, max_error=0.03, risk_confidence=0.95, window=200, every=10, step=0.02)
    for i in range(40):  # 40 samples, all agreeing: too few to certify a lower tau, nothing refutes this one
        assert control.add(AuditSample(0.95 + (i % 5) / 100, True)) is None
    moves = [control.add(AuditSample(0.95, i % 3 != 0)) for i in range(30)]  # a third disagree at tau 0.95
    rises = [m for m in moves if m is not None]
    assert rises and all(m.reason == "risk_up" and m.new - m.old <= 0.02 + 1e-9 for m in rises)
    assert control.tau > 0.9 and control.refuted()
