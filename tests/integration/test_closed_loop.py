"""The closed loop (issue 19) on the real broker, the stand-in over real HTTP, the service as a subprocess.

Audit sampling (share, distill records, spend that reconciles with the stand-in's counters), the drift alarm
(fires and clears), the adaptive threshold (rises on a stream whose audit answers disagree) and the spend cap
(every full metrics window within the cap plus one request; accuracy drops no more than the threshold
change predicts).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer import contracts
from consumer.config import LlmConfig
from consumer.kafka.reader import read_topics
from consumer.sandbox.reviewgen import generate
from consumer.stream.control import AuditSampler
from tests.support import kafka
from tests.support.service import start_service, start_standin, stats

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(90)]
PRICE = LlmConfig().price()


def label_file(path: Path, rows: list[dict[str, Any]], flip: Callable[[int], bool] = lambda i: False) -> Path:
    """The oracle's label file: the true labels, or the other one where ``flip(i)``."""
    other = {"positive": "negative", "negative": "positive"}
    lines = [{"id": r["id"], "label": other[r["label"]] if flip(i) else r["label"]} for i, r in enumerate(rows)]
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    return path


@pytest.fixture
def oracle(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    procs = []

    def start(labels: Path) -> str:
        proc, url = start_standin(tmp_path / f"standin-{len(procs)}.log", "--latency-ms", "1-3", "--policy",
                                  "oracle", "--labels", str(labels))  # fmt: skip
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.kill()


def base_settings(topics: kafka.Topics, url: str, **more: Any) -> dict[str, Any]:
    names = {name: topics.make(name) for name in ("in", "out", "dlq", "distill", "metrics")}
    return {
        "topics__input": names["in"], "topics__output": names["out"], "topics__dlq": names["dlq"],
        "topics__distill": names["distill"], "topics__metrics": names["metrics"], "kafka__group_id": kafka.unique("g"),
        "llm__base_url": url, "llm__rpm": 1_000_000, "llm__tpm": 1_000_000_000, "metrics__interval_s": 1,
        "model__batch_size": 16,
    } | more  # fmt: skip


def run(tmp_path: Path, settings: dict[str, Any], count: int, name: str = "service") -> str:
    proc = start_service(tmp_path / f"{name}.log", "--max-messages", str(count), **settings)
    assert proc.wait(80) == 0, proc.log()[-3000:]
    return proc.log()


def read_all(topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(f.value) for f in read_topics({"bootstrap.servers": kafka.bootstrap()}, [topic], 30)]


def events(log: str, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            record = orjson.loads(line)
            if record.get("event") == name:
                found.append(record)
    return found


def final_metrics(topic: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    messages = read_all(topic)
    for message in messages:
        contracts.validate("metrics", message)
    finals = [m for m in messages if m["final"]]
    assert finals, "no final metrics message"
    return messages, finals[-1]


def test_audits_go_to_distill_and_their_spend_reconciles_with_the_standin(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, oracle: Callable[[Path], str]
) -> None:
    rows = [r.as_dict() for r in generate(600, seed=31, prefix="audit")]
    url = oracle(label_file(tmp_path / "labels.jsonl", rows))
    settings = base_settings(topics, url, router__threshold=0.9, audit__rate=0.2, audit__seed=5)
    kafka.produce_reviews(settings["topics__input"], rows)
    run(tmp_path, settings, len(rows))
    labeled = {m["id"]: m for m in read_all(settings["topics__output"])}
    distill = read_all(settings["topics__distill"])
    _messages, final = final_metrics(settings["topics__metrics"])
    loop, totals, seen = final["loop"]["totals"], final["totals"], stats(url)
    small = [i for i, m in labeled.items() if m["source"] == "small"]
    audited = [d for d in distill if d.get("audit")]
    chosen = {i for i in small if AuditSampler(0.2, 5).chosen(i)}
    share = len(chosen) / len(small)
    report(
        f"audits: {len(audited)} of {len(small)} small-path reviews ({share:.1%} chosen at rate 0.2, "
        f"{loop['audit_skipped']} skipped); agreement {loop['agreement']['estimate']:.3f} "
        f"[{loop['agreement']['low']:.3f}, {loop['agreement']['high']:.3f}]; audit spend ${loop['audit_cost_usd']:.6f} "
        f"of ${totals['cost_usd']:.6f}; stand-in {seen['requests']} requests = {totals['large']} large + "
        f"{loop['audits']} audits"
    )
    assert abs(share - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(small))
    assert len(audited) + loop["audit_skipped"] + loop["audit_failed"] == len(chosen)
    assert {d["id"] for d in audited} <= chosen and len(audited) == loop["audits"]
    assert all(labeled[d["id"]]["source"] == "small" and labeled[d["id"]]["label"] == d["small_label"] for d in audited)
    assert all(m["threshold"] == 0.9 for m in labeled.values())
    assert len(labeled) == len(rows) and totals["llm_retries"] == 0
    assert seen["requests"] == totals["llm_requests"]  # cache hits (identical texts) cost no request
    assert totals["large"] - totals["cache_hits"] <= seen["requests"] <= totals["large"] + loop["audits"]
    assert seen["prompt_tokens"] == totals["prompt_tokens"] + loop["audit_prompt_tokens"]
    billed = (seen["prompt_tokens"] * PRICE.input_per_mtok + seen["completion_tokens"] * PRICE.output_per_mtok) / 1e6
    assert totals["cost_usd"] == pytest.approx(billed, abs=1e-9, rel=0)
    labeled_cost = sum(m["cost_usd"] for m in labeled.values())
    assert loop["audit_cost_usd"] == pytest.approx(totals["cost_usd"] - labeled_cost, abs=1e-9, rel=0)
    assert loop["audit_cost_usd"] > 0 and final["now"]["audit_cost_usd_per_hour"] >= 0


def test_the_drift_alarm_fires_when_audits_disagree_and_clears_when_they_agree_again(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, oracle: Callable[[Path], str]
) -> None:
    rows = [r.as_dict() for r in generate(700, seed=32, prefix="drift")]
    flipped = 200  # the oracle contradicts the truth for the first 200 reviews, then tells it
    url = oracle(label_file(tmp_path / "labels.jsonl", rows, lambda i: i < flipped))
    settings = base_settings(topics, url, router__threshold=0.8, audit__rate=1.0, audit__min_agreement=0.8,
                             audit__window=60, kafka__group_id=kafka.unique("drift"))  # fmt: skip
    producer = paced(settings["topics__input"], rows, 150)  # several metrics windows
    log = run(tmp_path, settings, len(rows))
    producer.join(30)
    fired, cleared = events(log, "drift_alarm"), events(log, "drift_cleared")
    messages, final = final_metrics(settings["topics__metrics"])
    report(
        f"drift: alarm at {fired[0]['agreement'] if fired else None} agreement ({fired[0]['audits'] if fired else 0} "
        f"audits), cleared at {cleared[0]['low'] if cleared else None} lower bound; "
        f"{sum(m['loop']['drift_alarm'] for m in messages)} of {len(messages)} windows alarmed"
    )
    assert len(fired) == 1 and fired[0]["high"] < 0.8
    assert len(cleared) == 1 and cleared[0]["low"] >= 0.82
    assert any(m["loop"]["drift_alarm"] for m in messages) and not final["loop"]["drift_alarm"]


def test_adaptive_mode_raises_tau_when_the_audit_answers_disagree(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, oracle: Callable[[Path], str]
) -> None:
    rows = [r.as_dict() for r in generate(500, seed=33, prefix="adapt")]
    url = oracle(label_file(tmp_path / "labels.jsonl", rows, lambda i: i % 3 == 0))  # a third disagree
    settings = base_settings(topics, url, router__threshold=0.8, router__mode="adaptive", router__max_error=0.05,
                             audit__rate=0.5, audit__window=50)  # fmt: skip
    kafka.produce_reviews(settings["topics__input"], rows)
    log = run(tmp_path, settings, len(rows))
    changes = events(log, "threshold_changed")
    labeled = read_all(settings["topics__output"])
    _messages, final = final_metrics(settings["topics__metrics"])
    taus = [m["threshold"] for m in labeled if m["source"] == "small"]
    report(
        f"adaptive: tau 0.8 -> {final['threshold']} in {len(changes)} changes; small path tau {min(taus)}..{max(taus)}"
    )
    assert changes and all(c["reason"] == "risk_up" and c["new"] - c["old"] <= 0.02 + 1e-9 for c in changes)
    assert final["threshold"] > 0.8 and final["loop"]["totals"]["threshold_changes"] == len(changes)
    assert max(taus) > 0.8  # labeled.v1 records the tau in force


def paced(topic: str, rows: list[dict[str, Any]], per_s: float) -> threading.Thread:
    """Produce ``rows`` at about ``per_s`` a second (a steady stream, so windows are alike)."""

    def produce() -> None:
        start = time.monotonic()
        step = max(1, int(per_s / 5))  # five flushes a second
        for i in range(0, len(rows), step):
            kafka.produce_reviews(topic, rows[i : i + step])
            time.sleep(max(0.0, start + (i + step) / per_s - time.monotonic()))  # pacing the source, not a sync

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    return thread


def spend_run(tmp_path: Path, topics: kafka.Topics, url: str, rows: list[dict[str, Any]], name: str,
              **more: Any) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:  # fmt: skip
    settings = base_settings(topics, url, router__threshold=0.995, audit__rate=0.0, **more)
    producer = paced(settings["topics__input"], rows, 60)
    run(tmp_path, settings, len(rows), name)
    producer.join(30)
    messages, _final = final_metrics(settings["topics__metrics"])
    return messages, {m["id"]: m for m in read_all(settings["topics__output"])}


def test_the_spend_cap_holds_every_full_window_and_costs_the_accuracy_it_predicts(
    report: Callable[[str], None], topics: kafka.Topics, tmp_path: Path, oracle: Callable[[Path], str]
) -> None:
    rows = [r.as_dict() for r in generate(540, seed=34, prefix="cap")]
    truth = {r["id"]: r["label"] for r in rows}
    url = oracle(label_file(tmp_path / "labels.jsonl", rows))
    free_windows, free = spend_run(tmp_path, topics, url, rows, "free")
    full = [m for m in free_windows[1:] if not m["final"] and m["window"]["labeled"] > 0]
    free_rate = (
        sum(m["window"]["cost_usd"] for m in full)
        / sum((m["window_end_ms"] - m["window_start_ms"]) for m in full)
        * 3.6e6
    )
    cap = free_rate / 2
    windows, capped = spend_run(tmp_path, topics, url, rows, "capped", budget__usd_per_hour=cap,
                                budget__priority="spend", budget__min_threshold=0.5)  # fmt: skip
    one_request = max(m["cost_usd"] for m in free.values())
    worst = 0.0
    for m in windows:
        if m["final"]:
            continue
        allowance = cap * (m["window_end_ms"] - m["window_start_ms"]) / 3.6e6
        worst = max(worst, m["window"]["cost_usd"] - allowance)
        assert m["window"]["cost_usd"] <= allowance + one_request + 1e-12, (m["window"], allowance, one_request)
    lost = [i for i in truth if free[i]["source"] == "large" and capped[i]["source"] != "large"]
    error = band_errors(free, truth)  # the small path's error by confidence, where the free run asked the LLM
    risks = [error[band(capped[i]["small"]["confidence"])] for i in lost]
    predicted = sum(risks) / len(rows)
    sigma = math.sqrt(sum(r * (1 - r) for r in risks)) / len(rows)
    accuracy = {
        name: sum(out[i]["label"] == truth[i] for i in truth) / len(rows)
        for name, out in (("free", free), ("capped", capped))
    }
    drop = accuracy["free"] - accuracy["capped"]
    taus = [m["threshold"] for m in windows]
    fallbacks = sum(m["fallback_reason"] == "budget" for m in capped.values())
    report(
        f"spend cap: unconstrained ${free_rate:.6f}/h, cap ${cap:.6f}/h; worst full window {worst:+.9f} USD over its "
        f"allowance (one request ${one_request:.9f}); tau 0.995 -> min {min(taus)}; {fallbacks} budget fallbacks; "
        f"accuracy {accuracy['free']:.4f} -> {accuracy['capped']:.4f} (drop {drop:.4f}, predicted {predicted:.4f} "
        f"+/- {sigma:.4f} from {len(lost)} reviews without the LLM)"
    )
    assert cost_of(capped) < 0.75 * cost_of(free)
    assert drop <= predicted + 3 * sigma + 1 / len(rows)


def band(confidence: float) -> int:
    return min(int(confidence * 50), 49)  # bands of 0.02


def band_errors(run: dict[str, dict[str, Any]], truth: dict[str, str]) -> dict[int, float]:
    """The small model's error rate per confidence band over the reviews the LLM answered (their truth known)."""
    wrong: dict[int, list[bool]] = {}
    for i, m in run.items():
        if m["source"] == "large":
            wrong.setdefault(band(m["small"]["confidence"]), []).append(m["small"]["label"] != truth[i])
    overall = sum(sum(w) for w in wrong.values()) / max(1, sum(len(w) for w in wrong.values()))
    return {b: sum(wrong[b]) / len(wrong[b]) if wrong.get(b) else overall for b in range(50)}


def cost_of(out: dict[str, dict[str, Any]]) -> float:
    return float(sum(m["cost_usd"] for m in out.values()))
