"""The closed loop on a real run (issue 19): drift alarm, adaptive tau and spend cap, with a plot for the docs.

A books-only small model is trained at run time (``shunt train --domains books --test-share 0.5``, into a
temporary folder: never committed). The stream is the books reviews it never saw, then every kitchen review,
from ../shared/data (read at run time, never copied). The stand-in LLM is the oracle with the true labels.
The service runs as ``shunt run`` on the real broker, once per scenario:

- ``fixed-0.05``: tau 0.9, the issue's audit rate 0.05 (and the spend the cap is set against);
- ``fixed``: tau 0.9, audit rate 0.5: the drift alarm, its delay predicted with ``DriftAlarm.expected_delay``
  from the small path's agreement on each part (scored offline with the same model), then measured;
- ``adaptive``: the same with ``router.mode = "adaptive"``: tau's rise and the small path's error on kitchen;
- ``budget``: tau 0.9, audit rate 0.05, a cap at half of ``fixed-0.05``'s spend, ``budget.priority = spend``.

    KAFKA_BOOTSTRAP=127.0.0.1:25450 .venv/bin/python -m ops.bench.closed_loop [--model DIR] [--rate 100]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from consumer.kafka.reader import read_topics
from consumer.offline.datasets import load_amazon, split_amazon
from consumer.small.scoring import OnnxScorer
from consumer.stream.control import DriftAlarm
from consumer.stream.risk import clopper_pearson
from ops.bench.children import PYTHON, Child, standin_answers, start_service, wait_for
from ops.bench.report import REPO, console, write_json
from ops.bench.topics import Topics, run_id

TAU, MAX_ERROR, WINDOW, MIN_AGREEMENT = 0.9, 0.03, 100, 0.96
INTERVAL_S = 1.0
SCENARIOS: list[tuple[str, dict[str, Any]]] = [
    ("fixed-0.05", {"audit__rate": 0.05}),
    ("fixed", {"audit__rate": 0.5}),
    ("adaptive", {"audit__rate": 0.5, "router__mode": "adaptive", "router__max_error": MAX_ERROR}),
    ("budget", {"audit__rate": 0.05, "budget__priority": "spend", "budget__min_threshold": 0.5}),
]


def train_books(out: Path) -> Path:
    console.print(f"training a books-only model into {out} (about 2 minutes)")
    args = [PYTHON, "-m", "consumer", "train", "--domains", "books", "--test-share", "0.5", "--no-baseline"]
    subprocess.run([*args, "--out", str(out)], check=True, capture_output=True)
    return out


def stream_rows() -> tuple[list[dict[str, Any]], int]:
    """The held-out books reviews, then every kitchen review; and where kitchen starts."""
    books = split_amazon(load_amazon(None, ["books"]), 0.5)[1]
    kitchen = load_amazon(None, ["kitchen"])
    return [*books, *kitchen], len(books)


def offline_agreement(model: Path, rows: Sequence[dict[str, Any]], tau: float) -> tuple[float, float]:
    """(small-path share, small-path accuracy) of ``rows`` at ``tau``, scored by the model itself."""
    scorer = OnnxScorer.load(model, max_tokens=256, intra_op_threads=1, inter_op_threads=1)
    preds = [p for i in range(0, len(rows), 64) for p in scorer.predict([r["text"] for r in rows[i : i + 64]])]
    kept = [p.label == r["label"] for p, r in zip(preds, rows, strict=True) if p.confidence >= tau]
    return len(kept) / len(rows), sum(kept) / max(1, len(kept))


def produce_paced(bootstrap: str, topic: str, rows: Sequence[dict[str, Any]], per_s: float) -> threading.Thread:
    from confluent_kafka import Producer

    def run() -> None:
        producer, start = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5}), time.monotonic()
        for i, row in enumerate(rows):
            value = {"schema_version": "review.v1", "id": row["id"], "text": row["text"]}
            producer.produce(topic, orjson.dumps(value), key=row["id"])
            producer.poll(0)
            time.sleep(max(0.0, start + (i + 1) / per_s - time.monotonic()))  # pacing the stream
        producer.flush(60)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_scenario(name: str, topics: Topics, bootstrap: str, llm: str, model: Path, rows: list[dict[str, Any]],
                 rate: float, **settings: Any) -> dict[str, Any]:  # fmt: skip
    """One service run on its own topics; returns its metrics messages, outputs, distill records and events."""
    source = topics.make(f"{name}-in")
    config = {"topics__input": source, **topics.for_service(name), "kafka__group_id": f"bench-{topics.run_id}-{name}",
              "llm__base_url": llm, "llm__rpm": 1_000_000, "llm__tpm": 1_000_000_000, "model__path": str(model),
              "metrics__interval_s": INTERVAL_S, "router__threshold": TAU, "audit__window": WINDOW,
              "audit__min_agreement": MIN_AGREEMENT, "service__max_messages": len(rows)} | settings  # fmt: skip
    console.print(
        f"[bold]{name}[/]: {len(rows)} reviews at {rate:.0f}/s, " + ", ".join(f"{k}={v}" for k, v in settings.items())
    )
    producer = produce_paced(bootstrap, source, rows, rate)
    with start_service(f"closed-loop-{name}", bootstrap, config) as service:
        service.wait(len(rows) / rate + 120)
        log = service.log_path.read_text(errors="replace")
    producer.join(60)
    conf = {"bootstrap.servers": bootstrap}
    read = {kind: [orjson.loads(f.value) for f in read_topics(conf, [config[f"topics__{kind}"]], 60)]
            for kind in ("metrics", "output", "distill")}  # fmt: skip
    return {**read, "events": _events(log)}


def _events(log: str) -> list[dict[str, Any]]:
    names = {"drift_alarm", "drift_cleared", "threshold_changed", "budget_exceeded"}
    out = []
    for line in log.splitlines():
        if line.startswith("{") and any(f'"{n}"' in line for n in names):
            event = orjson.loads(line)
            if event.get("event") in names:
                event["at_ms"] = int(
                    datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp() * 1000
                )
                out.append(event)
    return out


def drift_figures(
    run: dict[str, Any], kitchen_ids: set[str], predicted: int | None, share: float, rate: float
) -> dict[str, Any]:
    alarms = [e for e in run["events"] if e["event"] == "drift_alarm"]
    at = alarms[0]["at_ms"] if alarms else None
    kitchen_out = [m for m in run["output"] if m["id"] in kitchen_ids]
    seen = None if at is None else sum(m["processed_at_ms"] <= at for m in kitchen_out)
    audits = None if at is None else sum(d.get("audit", False) and d["id"] in kitchen_ids and d["created_at_ms"] <= at
                                         for d in run["distill"])  # fmt: skip
    return {"alarm_fired": at is not None, "predicted_audits": predicted,
            "predicted_kitchen_reviews": None if predicted is None else round(predicted / (rate * share)),
            "measured_kitchen_reviews": seen, "measured_kitchen_audits": audits}  # fmt: skip


def kitchen_error(run: dict[str, Any], truth: dict[str, str], kitchen_ids: set[str]) -> dict[str, Any]:
    small = [m for m in run["output"] if m["id"] in kitchen_ids and m["source"] == "small"]
    wrong = sum(m["label"] != truth[m["id"]] for m in small)
    interval = clopper_pearson(wrong, len(small), 0.95)
    taus = [m["threshold"] for m in run["metrics"]]
    risen = [m for m in small if m["threshold"] > TAU]  # decided after the risk rule raised tau
    after = clopper_pearson(sum(m["label"] != truth[m["id"]] for m in risen), len(risen), 0.95)
    return {"after_rise_reviews": len(risen), "after_rise_error": after.estimate, "after_rise_error_high": after.high,
            **_error_block(small, wrong, interval, taus)}  # fmt: skip


def _error_block(small: list[Any], wrong: int, interval: Any, taus: list[float]) -> dict[str, Any]:
    return {"kitchen_small_reviews": len(small), "kitchen_small_error": interval.estimate, "error_high": interval.high,
            "slack": None if interval.estimate is None else interval.high - interval.estimate,
            "tau_start": taus[0] if taus else None, "tau_end": taus[-1] if taus else None,
            "tau_max": max(taus) if taus else None}  # fmt: skip


def spend_figures(run: dict[str, Any], cap: float) -> dict[str, Any]:
    one = max((m["cost_usd"] for m in run["output"]), default=0.0)
    windows = [m for m in run["metrics"] if not m["final"]]
    over = [m["window"]["cost_usd"] - cap * (m["window_end_ms"] - m["window_start_ms"]) / 3.6e6 for m in windows]
    return {"cap_usd_per_hour": cap, "one_request_usd": one, "worst_window_over_usd": max(over, default=0.0),
            "windows": len(windows), "windows_within": sum(o <= one + 1e-12 for o in over),
            "budget_fallbacks": sum(m["fallback_reason"] == "budget" for m in run["output"])}  # fmt: skip


def spend_rate(run: dict[str, Any]) -> float:
    full = [m for m in run["metrics"][1:] if not m["final"]]
    span_ms = sum(m["window_end_ms"] - m["window_start_ms"] for m in full)
    return sum(m["window"]["cost_usd"] for m in full) / max(span_ms, 1) * 3.6e6


def predicted_drop(free: dict[str, Any], capped: dict[str, Any], truth: dict[str, str]) -> float:
    """What lowering tau should cost: for each review that lost the LLM under the cap, the small model's error
    rate in its confidence band (0.02 wide), measured where the free run asked the LLM."""
    bands: dict[int, list[bool]] = {}
    before = {m["id"]: m for m in free["output"]}
    for m in before.values():
        if m["source"] == "large":
            bands.setdefault(min(int(m["small"]["confidence"] * 50), 49), []).append(
                m["small"]["label"] != truth[m["id"]]
            )
    lost = [m for m in capped["output"] if m["source"] != "large" and before[m["id"]]["source"] == "large"]
    risk = [bands.get(min(int(m["small"]["confidence"] * 50), 49)) or [False] for m in lost]
    return sum(sum(r) / len(r) for r in risk) / max(1, len(capped["output"]))


def accuracy(run: dict[str, Any], truth: dict[str, str]) -> float:
    return sum(m["label"] == truth[m["id"]] for m in run["output"]) / max(1, len(run["output"]))


def plot(runs: dict[str, dict[str, Any]], cap: float, switch_ms: dict[str, int | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tau, ax_agree, ax_spend) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for name, run in runs.items():
        ms = run["metrics"]
        t0 = ms[0]["window_start_ms"]
        x = [(m["window_end_ms"] - t0) / 1000 for m in ms]
        ax_tau.step(x, [m["threshold"] for m in ms], where="post", label=name)
        if name == "fixed":
            est = [m["loop"]["window"]["agreement"] for m in ms]
            ax_agree.plot(x, [m["loop"]["drift_recent"]["estimate"] for m in ms], label="last 100 audits")
            low, high = ([m["loop"]["drift_recent"][k] for m in ms] for k in ("low", "high"))
            ax_agree.fill_between(x, low, high, alpha=0.25, label="95% CP interval")
            ax_agree.scatter(x, [e["estimate"] for e in est], s=8, color="grey", label="per window")
            alarm = [m["loop"]["drift_alarm"] for m in ms]
            ax_agree.fill_between(x, 0, 1, where=alarm, color="red", alpha=0.1, step="post", label="drift alarm")
        if name in ("fixed-0.05", "budget"):
            ax_spend.step(x, [m["now"]["cost_usd_per_hour"] for m in ms], where="post", label=f"{name} spend")
        if switch_ms.get(name) is not None:
            for ax in (ax_tau, ax_agree, ax_spend):
                ax.axvline((switch_ms[name] - t0) / 1000, color="black", lw=0.5, ls=":")  # type: ignore[operator]
    ax_agree.axhline(MIN_AGREEMENT, color="red", lw=0.8, ls="--", label="audit.min_agreement")
    ax_spend.axhline(cap, color="red", lw=0.8, ls="--", label="budget.usd_per_hour")
    ax_tau.set_ylabel("tau in force")
    ax_agree.set_ylabel("small vs LLM agreement")
    ax_agree.set_ylim(0.6, 1.01)
    ax_spend.set_ylabel("LLM spend, USD/hour")
    ax_spend.set_xlabel("seconds since the first metrics window (dotted: books -> kitchen)")
    for ax in (ax_tau, ax_agree, ax_spend):
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="A books-only model folder (default: train one now).")
    parser.add_argument("--rate", type=float, default=100.0, help="Reviews per second produced.")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "closed-loop.png")
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:25450")
    with tempfile.TemporaryDirectory(prefix="closed-loop-") as tmp:
        results = _run(bootstrap, args.model or train_books(Path(tmp) / "books"), Path(tmp), args.rate, args.plot)
    write_json("closed_loop", results)


def _run(bootstrap: str, model: Path, tmp: Path, rate: float, plot_path: Path) -> dict[str, Any]:
    rows, cut = stream_rows()
    truth = {r["id"]: r["label"] for r in rows}
    kitchen_ids = {r["id"] for r in rows[cut:]}
    labels = tmp / "labels.jsonl"
    labels.write_bytes(b"\n".join(orjson.dumps({"id": r["id"], "label": r["label"]}) for r in rows) + b"\n")
    (books_share, books_acc), (kitchen_share, kitchen_acc) = (
        offline_agreement(model, part, TAU) for part in (rows[:cut], rows[cut:])
    )
    predicted = DriftAlarm(MIN_AGREEMENT, WINDOW).expected_delay(books_acc, kitchen_acc)
    port = 18000 + os.getpid() % 1000
    args = [PYTHON, "-m", "consumer", "llm-standin", "--port", str(port), "--policy", "oracle", "--labels"]
    args += [str(labels), "--latency-ms", "1-3", "--log-level", "warning"]
    with Child("closed-loop-standin", args, dict(os.environ)) as _standin, Topics(bootstrap, run_id()) as topics:
        llm = f"http://127.0.0.1:{port}/v1"
        wait_for(lambda: standin_answers(port), 30)
        runs: dict[str, dict[str, Any]] = {}
        cap = 0.0
        for name, given in SCENARIOS:
            if name == "budget":
                cap = spend_rate(runs["fixed-0.05"]) / 2  # half of the unconstrained spend
            settings = given | ({"budget__usd_per_hour": cap} if name == "budget" else {})
            runs[name] = run_scenario(name, topics, bootstrap, llm, model, rows, rate, **settings)
    first = {n: min((m["processed_at_ms"] for m in r["output"] if m["id"] in kitchen_ids), default=None)
             for n, r in runs.items()}  # fmt: skip
    plot(runs, cap, first, plot_path)
    offline = {"books_small_share": books_share, "books_agreement": books_acc, "kitchen_small_share": kitchen_share,
               "kitchen_agreement": kitchen_acc, "tau": TAU, "window": WINDOW,
               "min_agreement": MIN_AGREEMENT}  # fmt: skip
    results = {
        "offline": offline,
        "drift_at_0.05": drift_figures(runs["fixed-0.05"], kitchen_ids, predicted, kitchen_share, 0.05),
        "drift_at_0.5": drift_figures(runs["fixed"], kitchen_ids, predicted, kitchen_share, 0.5),
        "adaptive": kitchen_error(runs["adaptive"], truth, kitchen_ids) | {"max_error": MAX_ERROR},
        "fixed_kitchen": kitchen_error(runs["fixed"], truth, kitchen_ids),
        "budget": budget_figures(runs["fixed-0.05"], runs["budget"], truth, cap),
        "plot": str(plot_path),
    }
    console.print_json(data=results)
    return results


def budget_figures(free: dict[str, Any], capped: dict[str, Any], truth: dict[str, str], cap: float) -> dict[str, Any]:
    return spend_figures(capped, cap) | {
        "unconstrained_usd_per_hour": spend_rate(free),
        "capped_usd_per_hour": spend_rate(capped),
        "accuracy_free": accuracy(free, truth),
        "accuracy_capped": accuracy(capped, truth),
        "predicted_drop": predicted_drop(free, capped, truth),
        "tau_min": min(m["threshold"] for m in capped["metrics"]),
    }


if __name__ == "__main__":
    main()
