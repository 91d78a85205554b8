"""Hot model reload (issue 10): the service watches a symlink; flipping it to a new version folder switches the
model between two batches without losing a message, and a broken folder is rejected while the old model keeps
serving. The service runs as a real subprocess against the real broker and the stand-in LLM."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer import contracts
from consumer.offline.distill import promote
from consumer.sandbox.reviewgen import generate
from tests.support import kafka
from tests.support.paths import ROOT
from tests.support.service import Collector, Process, start_service, start_standin

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]
DEFAULT_MODEL = ROOT / "models" / "shunt-sentiment"
PARTITIONS = 3
WAVE = 150  # reviews per wave, spread evenly over the partitions


def model_copy(target: Path, version: str | None = None, temperature: float | None = None) -> Path:
    """A copy of the shipped model; a new ``shunt_version`` and temperature make it a different version."""
    shutil.copytree(DEFAULT_MODEL, target)
    if version is not None:
        edit_json(target / "config.json", lambda config: config | {"shunt_version": version})
    if temperature is not None:
        edit_json(target / "calibration.json", lambda calibration: calibration | {"temperature": temperature})
    return target


def edit_json(path: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    path.write_bytes(orjson.dumps(change(orjson.loads(path.read_bytes()))))


def version_of(folder: Path) -> str:
    return str(orjson.loads((folder / "config.json").read_bytes())["shunt_version"])


@pytest.fixture
def fast_llm(tmp_path: Path) -> Iterator[str]:
    proc, url = start_standin(
        tmp_path / "standin.log", "--latency-ms", "1-20", "--rpm", "1000000", "--tpm", "1000000000"
    )
    yield url
    proc.kill()


@pytest.fixture
def service(topics: kafka.Topics, tmp_path: Path, fast_llm: str) -> Iterator[dict[str, Any]]:
    """The service on ``<tmp>/current -> <tmp>/v1`` (a copy of the shipped model), polling the link every 0.2 s."""
    link = tmp_path / "current"
    promote(link, model_copy(tmp_path / "v1"))
    settings: dict[str, Any] = {
        "topics__input": topics.make("in", partitions=PARTITIONS), "topics__output": topics.make("out"),
        "topics__dlq": topics.make("dlq"), "topics__distill": topics.make("distill"),
        "topics__metrics": topics.make("metrics"), "kafka__group_id": kafka.unique("g"), "llm__base_url": fast_llm,
        "llm__rpm": 1_000_000, "llm__tpm": 1_000_000_000, "router__threshold": 0.9,
        "model__path": link, "model__watch_interval_s": 0.2,
    }  # fmt: skip
    proc = start_service(tmp_path / "service.log", **settings)
    out = Collector(settings["topics__output"])
    yield {"proc": proc, "out": out, "link": link, "input": settings["topics__input"], "tmp": tmp_path}
    out.close()
    proc.kill()


def produce_wave(topic: str, seed: int) -> list[dict[str, Any]]:
    """One wave of reviews, the same number on every partition (explicitly, so each partition sees both waves)."""
    rows = [r.as_dict() for r in generate(WAVE, seed=seed, hard_share=0.3, prefix=f"w{seed}")]
    for partition in range(PARTITIONS):
        kafka.produce(topic, [orjson.dumps(r) for r in rows[partition::PARTITIONS]], partition=partition)
    return rows


def events(proc: Process, name: str) -> list[dict[str, Any]]:
    """The service's JSON log events called ``name``."""
    found = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            event = orjson.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def wait_event(proc: Process, name: str, timeout_s: float = 30) -> dict[str, Any]:
    def seen() -> bool:
        assert proc.proc.poll() is None, f"the service exited:\n{proc.log()[-3000:]}"
        return bool(events(proc, name))

    kafka.wait_for(seen, timeout_s, f"log event {name}")
    return events(proc, name)[0]


def wait_labelled(out: Collector, rows: list[dict[str, Any]], timeout_s: float = 90) -> None:
    want = {r["id"] for r in rows}

    def done() -> bool:
        out.poll(0.1)
        return want <= set(out.ids())

    kafka.wait_for(done, timeout_s, f"{len(want)} reviews labelled")


def wait_every_partition(out: Collector, per_partition: int, timeout_s: float = 60) -> None:
    def enough() -> bool:
        out.poll(0.1)
        counts = [sum(v["input"]["partition"] == p for v in out.values) for p in range(PARTITIONS)]
        return bool(min(counts) >= per_partition)

    kafka.wait_for(enough, timeout_s, f"{per_partition} outputs on each partition")


def stop(proc: Process) -> None:
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.log()[-3000:]


def versions_by_partition(values: list[dict[str, Any]]) -> dict[int, list[str]]:
    """Per input partition, the model versions in input-offset order, runs collapsed: [old, new] is one switch."""
    out: dict[int, list[str]] = {}
    for partition in range(PARTITIONS):
        ordered = sorted(
            (v for v in values if v["input"]["partition"] == partition), key=lambda v: v["input"]["offset"]
        )
        out[partition] = [version for version, _run in groupby(v["model_version"] for v in ordered)]
    return out


def test_hot_reload_switches_once_per_partition_and_loses_nothing(service: dict[str, Any]) -> None:
    proc, out, link, tmp = service["proc"], service["out"], service["link"], service["tmp"]
    old = version_of(tmp / "v1")
    first = produce_wave(service["input"], seed=1)
    wait_every_partition(out, 10)  # the old model is serving every partition
    new = version_of(model_copy(tmp / "v2", version="shunt-sentiment-reload00002", temperature=0.6))
    promote(link, tmp / "v2")
    reloaded = wait_event(proc, "model_reloaded")
    assert reloaded["version"] == new
    second = produce_wave(service["input"], seed=2)  # read after the swap: scored by the new model
    wait_labelled(out, first + second)
    stop(proc)
    out.poll(0.5)
    assert {v["id"] for v in out.values} == {r["id"] for r in first + second}
    for value in out.values:
        contracts.validate("labeled", value)
    assert versions_by_partition(out.values) == {p: [old, new] for p in range(PARTITIONS)}
    assert not events(proc, "model_reload_rejected")


def truncate_onnx(folder: Path) -> None:
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])


def three_labels(folder: Path) -> None:
    labels = {"0": "negative", "1": "neutral", "2": "positive"}
    edit_json(folder / "config.json", lambda config: config | {"id2label": labels, "num_labels": 3})


@pytest.mark.parametrize("corrupt", [truncate_onnx, three_labels], ids=["truncated-onnx", "id2label-mismatch"])
def test_a_broken_version_is_rejected_and_the_old_one_keeps_serving(
    service: dict[str, Any], corrupt: Callable[[Path], None]
) -> None:
    proc, out, link, tmp = service["proc"], service["out"], service["link"], service["tmp"]
    old = version_of(tmp / "v1")
    first = produce_wave(service["input"], seed=3)
    wait_every_partition(out, 10)
    broken = model_copy(tmp / "broken", version="shunt-sentiment-broken00003")
    corrupt(broken)
    promote(link, broken)
    rejected = wait_event(proc, "model_reload_rejected")
    assert rejected["reason"] and rejected["path"] == str(link)
    second = produce_wave(service["input"], seed=4)
    wait_labelled(out, first + second)
    assert proc.proc.poll() is None  # still running
    stop(proc)
    out.poll(0.5)
    assert {v["id"] for v in out.values} == {r["id"] for r in first + second}
    assert {v["model_version"] for v in out.values} == {old}
    assert not events(proc, "model_reloaded")


def test_a_version_with_other_labels_is_rejected_and_the_watcher_keeps_watching(service: dict[str, Any]) -> None:
    proc, out, link, tmp = service["proc"], service["out"], service["link"], service["tmp"]
    first = produce_wave(service["input"], seed=5)
    wait_every_partition(out, 10)
    renamed = model_copy(tmp / "renamed", version="shunt-sentiment-renamed0005")
    edit_json(renamed / "config.json", lambda c: c | {"id2label": {"0": "neg", "1": "pos"}, "label2id": {}})
    promote(link, renamed)  # loads and warms up fine; only the swap can tell its labels differ, and it must
    # be a rejection like any other, not the end of the watcher task
    wait_event(proc, "model_reload_rejected", timeout_s=15)
    new = version_of(model_copy(tmp / "v2", version="shunt-sentiment-reload00006", temperature=0.6))
    promote(link, tmp / "v2")
    assert wait_event(proc, "model_reloaded", timeout_s=15)["version"] == new
    wait_labelled(out, first)
    stop(proc)
