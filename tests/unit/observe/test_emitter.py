"""The metrics emitter over a fake sink: a failed window is logged and the next one carries on. Against the
real broker: tests/integration/test_emitter.py."""

from __future__ import annotations

import orjson
from structlog.testing import capture_logs

from consumer.observe.emitter import MetricsEmitter
from consumer.observe.meter import Meter
from consumer.observe.probe import Probe, ServiceInfo
from tests.unit.observe.fakes import PRICE, FakePipeline, FakePool, FakeSink, eventually, make_settings


async def test_emitter_logs_a_failed_window_and_carries_on() -> None:
    calls = iter([RuntimeError("model registry down")])

    def flaky() -> str:
        failure = next(calls, None)
        if failure is not None:
            raise failure
        return "m-1"

    sink = FakeSink()
    probe = Probe(ServiceInfo.from_settings(make_settings()), Meter(PRICE, 20), FakePipeline(), FakePool(), sink,
                  model_version=flaky)  # fmt: skip
    with capture_logs() as logs:
        async with MetricsEmitter(probe, "m", 0.05) as emitter:
            await eventually(lambda: len(sink.published) >= 2, what="two windows after a failure")
    assert any(e["event"] == "metrics_emit_failed" for e in logs)
    messages = [orjson.loads(out.value) for out in sink.published]
    assert messages[-1]["final"] and [m["seq"] for m in messages] == list(range(len(messages)))
    assert emitter.seq == len(messages)
