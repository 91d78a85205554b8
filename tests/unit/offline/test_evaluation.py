"""``shunt eval``: the arithmetic on small generated data, the answer files, and the command end to end
(from a replay file, and live against the stand-in over real HTTP with the cache)."""

from __future__ import annotations

import asyncio
import math
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import structlog
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from consumer.commands.evaluate import command
from consumer.config import DEFAULT_MODEL_DIR, PriceConfig, load_settings
from consumer.llm.prompting import build_prompt, count_prompt_tokens
from consumer.offline import evaluation as ev
from consumer.offline import selective
from consumer.offline.train import expected_calibration_error
from consumer.sandbox.standin import StandinConfig, StandinServer
from consumer.small import calibration

pytestmark = pytest.mark.timeout(120)

PROBS = {"negative": 0.3, "positive": 0.7}


@pytest.fixture(autouse=True)
def keep_logging_config() -> Iterator[None]:
    """The command configures structlog for its process; run in-process here, that must not leak into
    other tests (a filtering level would hide the events they capture)."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def item(
    truth: str, small: str, confidence: float, plain: str | None, s4l: str | None = None, cost: float = 1.0
) -> ev.Item:
    s4l_answer = ev.Answer(s4l if s4l is not None else plain, cost * 1.25)
    return ev.Item(truth, small, confidence, ev.Answer(plain, cost), s4l_answer)


def generated(n: int = 40, seed: int = 7) -> list[ev.Item]:
    """Reviews with a small model that is right 80% of the time and an LLM right 90%, costs 1..3."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        truth = rng.choice(["negative", "positive"])
        other = "positive" if truth == "negative" else "negative"
        small = truth if rng.random() < 0.8 else other
        plain = truth if rng.random() < 0.9 else other
        out.append(item(truth, small, rng.uniform(0.5, 0.999), plain, cost=rng.uniform(1, 3)))
    return out


# --- the arithmetic ------------------------------------------------------------------------------------------


def test_threshold_0_sends_nothing_and_costs_nothing() -> None:
    items = generated()
    baseline = ev.baseline_cost(items)
    for method in ("ds", "ds_plus"):
        point = ev.shunt_point(items, 0.0, method, baseline)
        assert (point.llm_share, point.cost_usd, point.cost_ratio) == (0.0, 0.0, 0.0)
        assert point.accuracy == ev.small_alone(items).accuracy


def test_threshold_1_sends_everything_and_ds_costs_the_llm_alone() -> None:
    items = generated()
    baseline = ev.baseline_cost(items)
    ds = ev.shunt_point(items, 1.0, "ds", baseline)
    llm = ev.llm_alone(items)
    assert ds.llm_share == 1.0
    assert ds.cost_usd == pytest.approx(baseline) and ds.cost_ratio == pytest.approx(1.0)
    assert (ds.accuracy, ds.macro_f1) == (llm.accuracy, llm.macro_f1)
    plus = ev.shunt_point(items, 1.0, "ds_plus", baseline)
    assert plus.llm_share == 1.0
    assert plus.cost_ratio == pytest.approx(1.25)  # every S4L answer here costs 1.25x its plain one


def test_share_and_cost_count_exactly_the_reviews_below_the_threshold() -> None:
    items = [
        item("positive", "positive", c, "positive", cost=cost) for c, cost in ((0.6, 1.0), (0.8, 2.0), (0.95, 4.0))
    ]
    point = ev.shunt_point(items, 0.8, "ds", ev.baseline_cost(items))
    assert point.llm_share == pytest.approx(1 / 3)  # 0.8 is not below 0.8: the small label stands
    assert point.cost_usd == 1.0 and point.cost_ratio == pytest.approx(1 / 7)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 0.999, math.nextafter(1.0, 0.0)])
def test_a_perfect_small_model_costs_nothing_below_threshold_1(threshold: float) -> None:
    rng = random.Random(3)
    truths = [rng.choice(["negative", "positive"]) for _ in range(30)]
    items = [item(t, t, 1.0, "negative") for t in truths]
    baseline = ev.baseline_cost(items)
    for method in ("ds", "ds_plus"):
        point = ev.shunt_point(items, threshold, method, baseline)
        assert (point.cost_usd, point.llm_share, point.accuracy, point.macro_f1) == (0.0, 0.0, 1.0, 1.0)


def test_when_the_llm_gave_up_the_small_label_stands_but_the_llm_alone_is_wrong() -> None:
    items = [item("positive", "positive", 0.6, None, cost=0.0)]
    assert ev.shunt_point(items, 1.0, "ds", 0.0).accuracy == 1.0
    assert ev.llm_alone(items).accuracy == 0.0


def test_a_missing_s4l_answer_below_the_threshold_is_an_error() -> None:
    items = [ev.Item("positive", "positive", 0.6, ev.Answer("positive", 1.0), None)]
    assert ev.shunt_point(items, 0.5, "ds_plus", 1.0).llm_share == 0.0  # not needed: fine
    with pytest.raises(ev.EvaluationError, match="no s4l answer"):
        ev.shunt_point(items, 0.7, "ds_plus", 1.0)


@given(st.lists(st.floats(0, 1), min_size=2, max_size=6), st.integers(0, 10_000))
def test_share_and_cost_never_fall_as_the_threshold_rises(thresholds: list[float], seed: int) -> None:
    items = generated(25, seed)
    swept = ev.sweep(items, sorted(thresholds))
    for points in swept.values():
        shares, costs = [p.llm_share for p in points], [p.cost_usd for p in points]
        assert shares == sorted(shares) and costs == sorted(costs)
    assert all(p.cost_ratio <= 1.0 + 1e-12 for p in swept["ds"])


def test_macro_f1_matches_sklearn() -> None:
    rng = random.Random(11)
    labels = ["a", "b", "c"]
    truth = [rng.choice(labels) for _ in range(200)]
    predicted = [t if rng.random() < 0.7 else rng.choice(labels) for t in truth]
    assert ev.macro_f1(truth, predicted, labels) == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert ev.macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"]) == pytest.approx((2 / 3 + 0.8) / 2)


def test_reliability_bins_give_the_same_ece_as_the_training_report() -> None:
    rng = np.random.default_rng(5)
    probs = rng.dirichlet([1.0, 1.0], size=500)
    truth = rng.integers(0, 2, size=500)
    bins = calibration.reliability(probs.max(axis=1).tolist(), (probs.argmax(axis=1) == truth).tolist())
    assert len(bins) == calibration.RELIABILITY_BINS and sum(b.count for b in bins) == 500
    assert calibration.expected_calibration_error(bins) == pytest.approx(expected_calibration_error(probs, truth))


# --- choosing a threshold ------------------------------------------------------------------------------------


def point(threshold: float, accuracy: float, cost_ratio: float) -> ev.Point:
    return ev.Point("ds_plus", threshold, accuracy, accuracy, cost_ratio, cost_ratio, cost_ratio)


POINTS = [
    point(0.0, 0.86, 0.0),
    point(0.8, 0.95, 0.31),
    point(0.9, 0.96, 0.45),
    point(0.95, 0.96, 0.6),
    point(1, 0.94, 1),
]


def test_each_goal_picks_its_threshold() -> None:
    assert ev.best_accuracy(POINTS) == POINTS[2]  # ties on accuracy go to the cheaper
    assert ev.cheapest_reaching(POINTS, 0.94) == POINTS[1]
    assert ev.best_under_cap(POINTS, 0.3) == POINTS[0]
    assert ev.cheapest_reaching(POINTS, 0.99) is None and ev.best_under_cap(POINTS, -1) is None


def test_the_recommendation_follows_the_cost_cap_when_given() -> None:
    found = ev.choices(POINTS, "ds_plus", 0.94, 0.5)
    assert [c.goal for c in found] == ["best_accuracy", "cheapest_at_llm_accuracy", "cost_cap"]
    assert ev.recommended(found, 0.5).point == POINTS[2]
    assert ev.recommended(found[:2], None).point == POINTS[1]
    unreachable = ev.choices(POINTS, "ds_plus", 0.99, None)
    assert ev.recommended(unreachable, None).goal == "best_accuracy"


@pytest.mark.parametrize("threshold", [0.0, 0.8, 0.95, 1.0])
def test_the_config_snippet_sets_the_threshold(
    tmp_path: Path, threshold: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHUNT_ROUTER__THRESHOLD", raising=False)
    toml, env = ev.config_snippet(threshold)
    (tmp_path / "shunt.toml").write_text(toml + "\n")
    assert load_settings(tmp_path / "shunt.toml").router.threshold == threshold
    name, _, value = env.partition("=")
    monkeypatch.setenv(name, value)
    assert load_settings().router.threshold == threshold


def test_thresholds_parse_sorted_and_unique_and_reject_nonsense() -> None:
    assert ev.parse_thresholds("0.9, 0.5,0.9,1") == (0.5, 0.9, 1.0)
    for bad in ("", "1.5", "x", "-0.1"):
        with pytest.raises(ValueError):
            ev.parse_thresholds(bad)


# --- answer files ----------------------------------------------------------------------------------------------


def test_the_cache_key_normalises_text_and_names_everything_the_prompt_carries() -> None:
    plain = build_prompt("Great  Kettle", PROBS, "plain")
    assert ev.question_key(plain, "m") == ev.question_key(build_prompt(" great kettle ", PROBS, "plain"), "m")
    assert ev.question_key(plain, "m") != ev.question_key(plain, "other-model")
    s4l = build_prompt("great kettle", PROBS, "s4l")
    assert ev.question_key(s4l, "m") != ev.question_key(plain, "m")
    retrained = build_prompt("great kettle", {"negative": 0.1, "positive": 0.9}, "s4l")
    assert ev.question_key(s4l, "m") != ev.question_key(retrained, "m")  # a different hint is a new question


def test_the_cache_survives_a_restart_and_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    cache = ev.AnswerCache(path)
    cache.add("k1", ev.Record("positive", 100, 5, "plain-v1", "m"))
    cache.add("k2", ev.Record(None, 0, 0, "plain-v1", "m", "retries_exhausted"))  # failures are asked again
    cache.close()
    with path.open("ab") as handle:
        handle.write(b'{"key": "k3", "lab')
    again = ev.AnswerCache(path)
    assert again.get("k1") == ev.Record("positive", 100, 5, "plain-v1", "m")
    assert again.get("k2") is None and again.get("k3") is None and again.skipped == 1
    again.close()
    assert b"great kettle" not in path.read_bytes()


def test_replay_rows_match_by_id_then_text_and_kind_specific_rows_win(tmp_path: Path) -> None:
    rows = [
        {"id": "r1", "label": "positive"},
        {"id": "r1", "prompt": "s4l", "label": "negative"},
        {"text": "Great  KETTLE", "label": "negative"},
    ]
    book = ev.ReplayBook(rows)
    assert book.find("r1", "whatever", "plain") == rows[0]
    assert book.find("r1", "whatever", "s4l") == rows[1]
    assert book.find(None, "great kettle", "s4l") == rows[2]
    assert book.find("r2", "unknown", "plain") is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "r1", "label": "positive"}\n{"id": "r2", "prompt": "fancy", "label": "x"}\n')
    with pytest.raises(ev.EvaluationError, match=r"bad.jsonl:2: 'prompt'"):
        ev.ReplayBook.load(bad)


def test_a_replay_row_without_tokens_is_priced_by_the_documented_estimate() -> None:
    prompt = build_prompt("great kettle", PROBS, "plain")
    record = ev.replayed_record({"id": "r1", "label": "positive"}, prompt, "standin")
    assert record.prompt_tokens == count_prompt_tokens(prompt.messages) and record.completion_tokens == 5
    recorded = ev.replayed_record(
        {"id": "r1", "label": "positive", "prompt_tokens": 7, "completion_tokens": 2}, prompt, "m"
    )
    assert (recorded.prompt_tokens, recorded.completion_tokens) == (7, 2)
    assert recorded.cost(PriceConfig(input_per_mtok=1e6, output_per_mtok=2e6)) == 7 + 4


# --- the command end to end --------------------------------------------------------------------------------------

TEXTS = {
    "positive": [
        "Great kettle, boils fast and looks lovely. Highly recommend it.",
        "I love this book, a wonderful and moving story from start to finish.",
        "Excellent sound quality and the battery lasts for days. Very happy.",
        "Works perfectly, well made, and arrived early. Five stars.",
        "A fun, smart film with a great cast. I would watch it again.",
        "Good value, easy to use and it does exactly what it says.",
    ],
    "negative": [
        "Terrible kettle, it leaked after two days. Do not buy.",
        "Boring book, badly written, I gave up halfway through.",
        "The headphones broke in a week and support never answered. Awful.",
        "Cheap plastic, stopped working, waste of money.",
        "A dull film, poor acting and a confusing plot. Avoid.",
        "Disappointed: it does not fit and the return was a hassle.",
    ],
}


@pytest.fixture
def model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "model.onnx").is_file():
        pytest.fail(f"the shipped default model is missing at {DEFAULT_MODEL_DIR}: train it with `shunt train`")
    return DEFAULT_MODEL_DIR


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    rows = [
        {"id": f"{label}-{i}", "text": text, "label": label}
        for label, texts in TEXTS.items()
        for i, text in enumerate(texts)
    ]
    return write_jsonl(tmp_path / "labelled.jsonl", rows)


@pytest.fixture
def truth_labels(tmp_path: Path, labelled: Path) -> Path:
    """The stand-in's label file for ``labelled``: ids and true labels only."""
    rows = [orjson.loads(line) for line in labelled.read_bytes().splitlines()]
    return write_jsonl(tmp_path / "labels.jsonl", [{"id": r["id"], "label": r["label"]} for r in rows])


def run_eval(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(command, [*args, "--log-level", "error"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = Path(args[args.index("--out") + 1])
    report: dict[str, Any] = orjson.loads((out / "report.json").read_bytes())
    return report


def without_run_details(report: dict[str, Any]) -> dict[str, Any]:
    return {**report, "created_at": None, "llm": {**report["llm"], "replay": None}}


def test_eval_from_a_replay_file_writes_the_report_answers_and_plots(
    tmp_path: Path, labelled: Path, model_dir: Path
) -> None:
    rows = [orjson.loads(line) for line in labelled.read_bytes().splitlines()]
    wrong = {"positive-0", "negative-1"}  # the recorded LLM is wrong on two of twelve
    flip = {"positive": "negative", "negative": "positive"}
    replay = write_jsonl(
        tmp_path / "replay.jsonl",
        [{"id": r["id"], "label": flip[r["label"]] if r["id"] in wrong else r["label"]} for r in rows],
    )
    out = tmp_path / "out"
    report = run_eval("--data", str(labelled), "--replay", str(replay), "--out", str(out), "--model", str(model_dir))

    assert report["data"]["reviews"] == 12 and report["llm"]["source"] == "replay"
    assert report["llm_alone"]["accuracy"] == pytest.approx(10 / 12) and report["llm_alone"]["cost_ratio"] == 1.0
    first, last = report["sweep"][0], report["sweep"][-1]
    assert first["threshold"] == 0.0 and first["ds"]["llm_share"] == 0.0 and first["ds_plus"]["cost_usd"] == 0.0
    assert first["ds"]["accuracy"] == report["small_alone"]["accuracy"]
    assert last["threshold"] == 1.0 and last["ds"]["llm_share"] == 1.0
    assert last["ds"]["cost_ratio"] == pytest.approx(1.0) and last["ds"]["accuracy"] == pytest.approx(10 / 12)
    assert last["ds_plus"]["cost_ratio"] < 1.0  # s4l-v2 carries the hint in fewer tokens than plain-v1
    assert report["recommended"]["method"] == "ds_plus"
    if report["recommended"]["point"] is not None:
        assert report["recommended"]["env"] == f"SHUNT_ROUTER__THRESHOLD={report['recommended']['threshold']!r}"
    assert report["calibration"]["bins"] == 15 and 0.0 <= report["calibration"]["ece"] <= 1.0
    curve = report["calibration"]["selective_accuracy"]
    assert [c["coverage"] for c in curve] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert curve[-1]["accuracy"] == pytest.approx(report["small_alone"]["accuracy"])
    assert 0.0 <= report["calibration"]["aurc"] <= 1.0
    for name in ("tradeoff.png", "reliability.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    answers = [orjson.loads(line) for line in (out / "answers.jsonl").read_bytes().splitlines()]
    assert len(answers) == report["answers"]["plain"] + report["answers"]["s4l"] and report["answers"]["plain"] == 12
    assert all("text" not in row for row in answers)  # rows with ids never copy the review text

    again = run_eval("--data", str(labelled), "--replay", str(out / "answers.jsonl"), "--out", str(tmp_path / "again"),
                     "--model", str(model_dir))  # fmt: skip
    assert without_run_details(again) == without_run_details(report)


def test_eval_recommends_within_the_default_cost_cap_and_none_restores_the_tie_rule(
    tmp_path: Path, labelled: Path, model_dir: Path
) -> None:
    rows = [orjson.loads(line) for line in labelled.read_bytes().splitlines()]
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"id": r["id"], "label": r["label"]} for r in rows])
    args = ["--data", str(labelled), "--replay", str(replay), "--model", str(model_dir)]
    report = run_eval(*args, "--out", str(tmp_path / "capped"))
    assert [row["threshold"] for row in report["sweep"]] == list(ev.DEFAULT_THRESHOLDS)
    assert len(ev.DEFAULT_THRESHOLDS) == 52 and ev.DEFAULT_THRESHOLDS[1:3] == (0.5, 0.51)
    assert report["cost_cap"] == ev.DEFAULT_COST_CAP == 0.31
    pick = report["recommended"]
    assert pick["goal"] == "cost_cap" and pick["point"]["cost_ratio"] <= 0.31
    within = [row["ds_plus"] for row in report["sweep"] if row["ds_plus"]["cost_ratio"] <= 0.31]
    assert pick["point"]["accuracy"] == max(point["accuracy"] for point in within)

    tied = run_eval(*args, "--out", str(tmp_path / "tied"), "--cost-cap", "none")
    assert tied["cost_cap"] is None and tied["recommended"]["goal"] == "cheapest_at_llm_accuracy"
    for bad in ("1.5", "a third"):
        result = CliRunner().invoke(command, [*args, "--out", str(tmp_path / "bad"), "--cost-cap", bad])
        assert result.exit_code == 2 and "--cost-cap" in result.output


def test_eval_refuses_a_replay_file_that_lacks_answers(tmp_path: Path, labelled: Path, model_dir: Path) -> None:
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"id": "positive-0", "label": "positive"}])
    result = CliRunner().invoke(
        command,
        ["--data", str(labelled), "--replay", str(replay), "--out", str(tmp_path), "--model", str(model_dir),
         "--thresholds", "0"],  # nothing is ever shunted at 0, so only the plain answers are needed
    )  # fmt: skip
    assert isinstance(result.exception, ev.EvaluationError)
    assert "lacks 11 answer(s)" in str(result.exception)


async def test_eval_live_asks_each_question_once_and_the_cache_makes_a_rerun_free(
    tmp_path: Path, labelled: Path, truth_labels: Path, model_dir: Path
) -> None:
    cache = tmp_path / "cache.jsonl"
    server = StandinServer(StandinConfig(policy="oracle", labels=truth_labels, accuracy=1.0))
    async with server as url:
        first = await eval_process(url, labelled, cache, tmp_path / "first", model_dir)
        asked = first["answers"]["questions"]
        assert server.stats()["requests"] == asked
        second = await eval_process(url, labelled, cache, tmp_path / "second", model_dir)
        assert server.stats()["requests"] == asked  # the rerun paid for nothing
    assert first["answers"]["fetched"] == asked and first["answers"]["failed"] == 0
    assert first["llm_alone"]["accuracy"] == 1.0 and first["llm"]["source"] == "live"
    assert second["answers"]["from_cache"] == asked and second["answers"]["fetched"] == 0
    assert second["answers"]["spent_usd"] == 0.0
    assert second["sweep"] == first["sweep"] and second["llm_alone"] == first["llm_alone"]
    assert len(cache.read_bytes().splitlines()) == asked


async def eval_process(url: str, data: Path, cache: Path, out: Path, model_dir: Path) -> dict[str, Any]:
    """``shunt eval`` as its own process (the stand-in answers from this test's event loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHUNT_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", "eval", "--data", str(data), "--llm-url", url, "--cache", str(cache),
        "--out", str(out), "--model", str(model_dir), "--log-level", "error",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    report: dict[str, Any] = orjson.loads((out / "report.json").read_bytes())
    return report


def test_eval_max_error_prints_the_certified_tau_and_sweeps_at_it(
    tmp_path: Path, labelled: Path, model_dir: Path
) -> None:
    rows = [orjson.loads(line) for line in labelled.read_bytes().splitlines()]
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"id": r["id"], "label": r["label"]} for r in rows])
    args = ["--data", str(labelled), "--replay", str(replay), "--model", str(model_dir)]
    report = run_eval(*args, "--out", str(tmp_path / "loose"), "--max-error", "0.5")
    risk = report["risk"]
    assert risk["threshold"] is not None and risk["upper_bound"] <= 0.5 and risk["kept"] >= 5  # 0.5**5 < 0.05
    assert risk["threshold"] in [row["threshold"] for row in report["sweep"]]  # evaluated at the certified tau
    assert risk["ds_plus"] is not None and risk["share_to_llm"] == pytest.approx(1 - risk["kept"] / 12)
    assert risk["env"] == f"SHUNT_ROUTER__THRESHOLD={risk['threshold']!r}"
    strict = run_eval(*args, "--out", str(tmp_path / "strict"), "--max-error", "0.01")["risk"]
    assert strict["threshold"] is None and strict["share_to_llm"] == 1.0  # 12 reviews can never certify 1%


def test_selective_accuracy_and_aurc_rank_by_confidence() -> None:
    confidences = [0.99, 0.6, 0.9, 0.7, 0.8, 0.95, 0.55, 0.65, 0.85, 0.75]
    correct = [True, False, True, True, False, True, False, True, True, True]
    curve = selective.selective_accuracy(confidences, correct, (0.5, 1.0))
    # the 5 most confident: 0.99 0.95 0.9 0.85 0.8 -> right, right, right, right, wrong
    assert curve[0] == {"coverage": 0.5, "accuracy": 0.8, "min_confidence": 0.8}
    assert curve[1]["accuracy"] == pytest.approx(0.7) and curve[1]["min_confidence"] == 0.55
    ranked = [True, True, True, True, False, True, True, True, False, False]
    risks = [1 - sum(ranked[:k]) / k for k in range(1, 11)]
    assert selective.aurc(confidences, correct) == pytest.approx(sum(risks) / 10)
    assert selective.selective_accuracy([], []) == [] and np.isnan(selective.aurc([], []))
