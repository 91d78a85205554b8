"""L4S distillation (issue 10): the two-stage logic on small generated data, the not-worse gate, reading the
distill topic on the real broker, and --promote flipping the link.
Generated reviews only (consumer.sandbox.reviewgen)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from consumer import contracts
from consumer.commands.distill import EXIT_REJECTED
from consumer.commands.distill import command as distill_command
from consumer.offline import datasets, distill
from consumer.offline import train as training
from consumer.sandbox.reviewgen import generate
from consumer.small.scoring import OnnxScorer
from tests.support import kafka

LABELS = ("negative", "positive")
TINY = training.TrainConfig(vocab_size=400, min_frequency=1, buckets=2**10, c_grid=(1.0, 10.0), folds=3, max_iter=500)
FAST = distill.DistillConfig(train=TINY)


def reviews(count: int, seed: int, hard_share: float, prefix: str) -> list[dict[str, Any]]:
    return [r.as_dict() for r in generate(count, seed=seed, hard_share=hard_share, prefix=prefix)]


def as_records(rows: list[dict[str, Any]], flip: bool = False) -> list[distill.DistillRecord]:
    """What the service would publish: the LLM's label (here the true one, or deliberately the wrong one)."""
    other = {"negative": "positive", "positive": "negative"}
    return [distill.DistillRecord(r["id"], r["text"], other[r["label"]] if flip else r["label"], "v0") for r in rows]


def distill_message(record: distill.DistillRecord) -> dict[str, Any]:
    message = {
        "schema_version": "distill.v1", "id": record.id, "text": record.text, "llm_label": record.llm_label,
        "small_label": "positive", "small_confidence": 0.6, "small_probs": {"negative": 0.4, "positive": 0.6},
        "model_version": record.model_version, "llm_model": "standin", "prompt_version": "s4l-v1",
        "created_at_ms": 1,
    }  # fmt: skip
    contracts.validate("distill", message)
    return message


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A data folder of plain generated reviews, a base model trained on its training split, and hard reviews
    (mixed and sarcastic: where the base model is weak) as the LLM's records."""
    root = tmp_path_factory.mktemp("distill")
    original = reviews(400, seed=1, hard_share=0.0, prefix="orig")
    data_dir = root / "data"
    data_dir.mkdir()
    (data_dir / datasets.AMAZON_TRAIN).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in original))
    train_rows, test_rows = datasets.split_amazon(original)
    trained = training.train(
        [r["text"] for r in train_rows], training.one_hot([r["label"] for r in train_rows], LABELS), LABELS, config=TINY
    )
    base = root / "models" / "base"
    training.write_model_folder(base, trained, name="tiny")
    hard = reviews(600, seed=2, hard_share=1.0, prefix="hard")
    return {"data_dir": data_dir, "base": base, "train": train_rows, "test": test_rows, "hard": hard}


def inputs_for(world: dict[str, Any], records: list[distill.DistillRecord]) -> distill.Inputs:
    return distill.Inputs(world["base"], records, world["train"], world["test"])


# --- pure pieces ------------------------------------------------------------------------------------


def test_llm_targets_put_the_llm_accuracy_on_its_label() -> None:
    targets = distill.llm_targets(["positive", "negative"], ("negative", "neutral", "positive"), 0.9)
    np.testing.assert_allclose(targets, [[0.05, 0.05, 0.9], [0.9, 0.05, 0.05]])


def test_new_weight_is_capped_so_new_records_never_swamp_the_original_data() -> None:
    config = distill.DistillConfig(new_weight=1.0, max_new_share=0.5)
    assert distill.new_weight(np.ones(100), n_old=1000, config=config) == 1.0
    weight = distill.new_weight(np.ones(5000), n_old=1000, config=config)
    assert weight * 5000 == pytest.approx(1000)  # half of all the weight, no more


def test_stage_one_confidence_is_low_where_the_llm_contradicts_the_rest() -> None:
    rows = reviews(240, seed=3, hard_share=0.0, prefix="s1")
    wrong = set(range(0, 240, 12))  # a noisy LLM: every twelfth answer is wrong
    records = [as_records([row], flip=i in wrong)[0] for i, row in enumerate(rows)]
    texts = [r.text for r in records]
    targets = distill.llm_targets([r.llm_label for r in records], LABELS, 0.94)
    tokenizer = training.train_tokenizer(texts, TINY.vocab_size, TINY.min_frequency)
    first = distill.stage_one(texts, targets, LABELS, tokenizer, TINY)
    assert first.trained is not None
    flipped = np.array([i in wrong for i in range(240)])
    assert first.confidence[flipped].mean() < 0.5 < first.confidence[~flipped].mean()
    assert first.confidence.max() == pytest.approx(1.0)


def test_stage_one_is_skipped_when_a_label_has_too_few_records() -> None:
    texts = ["great kettle", "love it", "awful"]
    targets = distill.llm_targets(["positive", "positive", "negative"], LABELS, 0.94)
    tokenizer = training.train_tokenizer(texts, 100, 1)
    first = distill.stage_one(texts, targets, LABELS, tokenizer, TINY)
    assert first.trained is None and first.note.startswith("skipped") and list(first.confidence) == [1, 1, 1]


def test_holdout_side_is_stable_as_the_topic_grows() -> None:
    records = as_records(reviews(2000, seed=4, hard_share=0.0, prefix="h"))
    train, held = distill.split_holdout(records, 0.2, seed=0)
    assert 0.15 < len(held) / len(records) < 0.25 and not {r.id for r in train} & {r.id for r in held}
    _train, held_later = distill.split_holdout(
        records + as_records(reviews(500, seed=5, hard_share=0, prefix="x")), 0.2, 0
    )
    assert {r.id for r in held} <= {r.id for r in held_later}  # what was held out stays held out


def test_parse_dedupe_and_select_records() -> None:
    rows: list[Any] = [
        {"id": "a", "text": "fine", "llm_label": "positive"},
        {"id": "a", "text": "fine", "llm_label": "negative"},  # re-delivered: the last answer wins
        {"id": "b", "text": "In The Test Set", "llm_label": "positive"},
        {"id": "c", "text": "odd", "llm_label": "neutral"},
        {"id": "d", "text": "no label"},
        None,
        "not an object",
    ]
    records, skipped = distill.parse_records(rows)
    assert skipped == 3 and len(records) == 4
    test_set = distill.EvalSet("t", ["in the  test set"], ["positive"], gate=True)
    kept, data = distill.select_records(records, LABELS, [test_set], FAST)
    assert [(r.id, r.llm_label) for r in kept] == [("a", "negative")]
    more = as_records(reviews(50, seed=8, hard_share=0.0, prefix="o"))
    in_order, _data = distill.select_records(more, LABELS, [test_set], FAST)
    reversed_order, _data = distill.select_records(more[::-1], LABELS, [test_set], FAST)
    assert in_order == reversed_order  # the read order of the partitions never changes the model
    assert data | {"holdout_share": 0} == {
        "records": 4, "duplicates": 1, "unknown_label": 1, "in_evaluation_sets": 1, "holdout_share": 0,
        "by_model_version": {"unknown": 1},
    }  # fmt: skip


def test_verdict_gates_only_the_original_holdout() -> None:
    def entry(change: float, gate: bool) -> dict[str, Any]:
        return {"gate": gate, "change": {"accuracy": change}}

    assert distill.verdict({"original_holdout": entry(-0.004, True), "hard": entry(-0.3, False)}, 0.005)[0]
    passed, reason = distill.verdict({"original_holdout": entry(-0.006, True)}, 0.005)
    assert not passed and "-0.60 points" in reason


def test_self_labels_are_the_small_paths_outputs_joined_to_their_reviews() -> None:
    outputs: list[Any] = [
        {"id": "a", "source": "small", "label": "positive"},
        {"id": "b", "source": "large", "label": "negative"},  # the LLM's answer: the distill topic has it
        {"id": "c", "source": "fallback", "label": "negative"},
        {"id": "d", "source": "small", "label": "negative"},  # its review is gone (retention)
        {"id": "e", "source": "small", "label": "negative"},
        {"id": "e", "source": "small", "label": "positive"},  # re-delivered: the last wins
        None,
    ]
    reviews_read: list[Any] = [
        {"id": "e", "text": "sturdy pan"}, {"id": "a", "text": "keeps tea hot"}, {"id": "b", "text": "leaks"},
        {"id": "x", "text": "never labelled"}, "not an object", None,
    ]  # fmt: skip
    found, counts = distill.selflabels.join(outputs, reviews_read)
    assert found == [
        distill.SelfLabel("a", "keeps tea hot", "positive"),
        distill.SelfLabel("e", "sturdy pan", "positive"),
    ]
    assert counts == {"small_outputs": 3, "other_outputs": 3, "without_input": 1}
    assert distill.selflabels.usable(found, {"keeps tea hot"}, set(), LABELS) == found[1:]  # a test review
    assert distill.selflabels.usable(found, set(), {"e"}, LABELS) == found[:1]  # the LLM answered it: its label wins
    assert distill.selflabels.usable(found, set(), set(), ("neg", "pos")) == []  # another model's label set
    assert distill.selflabels.cap_weight(100, 1000) == 1.0
    assert distill.selflabels.cap_weight(4000, 1000) * 4000 == pytest.approx(1000)  # never outweigh the original


def test_self_labels_join_stage_two_and_the_report(world: dict[str, Any], tmp_path: Path) -> None:
    rows = reviews(120, seed=9, hard_share=0.0, prefix="self")
    own = [distill.SelfLabel(r["id"], r["text"], r["label"]) for r in rows]
    own.append(distill.SelfLabel("in-test", world["test"][0]["text"], world["test"][0]["label"]))
    hard = as_records(world["hard"])
    own.append(distill.SelfLabel(hard[0].id, hard[0].text, hard[0].llm_label))  # the LLM answered this one
    inputs = distill.Inputs(world["base"], hard, world["train"], world["test"], self_labels=own)
    outcome = distill.run(inputs, tmp_path, FAST)
    report = outcome.report
    assert report["data"]["self_labels"] == 120  # not the test review, not the one the LLM answered
    assert report["training"]["stage2"]["self_labels"] == 120
    assert report["training"]["stage2"]["self_label_weight"] == 1.0
    assert report["options"]["original_targets"] == "labels"
    assert outcome.passed


# --- the whole run ----------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_tokenizer", [False, True])
def test_distilling_hard_reviews_helps_where_the_model_was_weak(
    world: dict[str, Any], tmp_path: Path, keep_tokenizer: bool
) -> None:
    config = distill.DistillConfig(train=TINY, keep_tokenizer=keep_tokenizer)
    outcome = distill.run(inputs_for(world, as_records(world["hard"])), tmp_path, config)
    report = outcome.report
    assert outcome.passed and outcome.path is not None and outcome.path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [outcome.path.name]  # no staging folder left behind
    hard, original = report["evaluation"]["hard_holdout"], report["evaluation"]["original_holdout"]
    assert hard["base"]["n"] > 50
    assert hard["candidate"]["accuracy"] > hard["base"]["accuracy"] + 0.1, hard
    assert original["change"]["accuracy"] >= -0.005, original
    assert report["data"]["train"] + report["data"]["holdout"] == len(world["hard"])
    assert report["training"]["stage1"]["status"] == "fitted"
    scorer = OnnxScorer.load(outcome.path)
    assert scorer.version == report["candidate"]["version"] != report["base"]["version"]
    config_json = orjson.loads((outcome.path / "config.json").read_bytes())
    assert config_json["distilled_from"] == report["base"]["version"]
    assert config_json["training_data"] == {
        "domains": None,
        "split_seed": datasets.DEFAULT_SPLIT_SEED,
        "test_share": 0.2,
        "uci_weight": 0.0,
    }
    assert orjson.loads((outcome.path / distill.REPORT_FILE).read_bytes()) == report


def test_a_candidate_worse_on_the_original_data_is_not_written(world: dict[str, Any], tmp_path: Path) -> None:
    # An LLM that answers the opposite on plain reviews, trusted fully and weighted heavily: it must not ship.
    bad = as_records(reviews(300, seed=6, hard_share=0.0, prefix="bad"), flip=True)
    config = distill.DistillConfig(train=TINY, new_weight=20.0, max_new_share=0.95, llm_accuracy=1.0)
    outcome = distill.run(inputs_for(world, bad), tmp_path, config)
    assert not outcome.passed and outcome.path is None
    assert outcome.report["evaluation"]["original_holdout"]["change"]["accuracy"] < -0.2
    assert list(tmp_path.iterdir()) == []


def test_cli_from_a_file_writes_reports_and_promotes(world: dict[str, Any], tmp_path: Path) -> None:
    records_file = tmp_path / "distill.jsonl"
    records_file.write_bytes(b"".join(orjson.dumps(distill_message(r)) + b"\n" for r in as_records(world["hard"])))
    link, models = tmp_path / "current", tmp_path / "models"
    distill.promote(link, world["base"])
    args = ["--file", str(records_file), "--data-dir", str(world["data_dir"]), "--base-model", str(world["base"]),
            "--out", str(models), "--promote", str(link), "--vocab-size", "400"]  # fmt: skip
    result = CliRunner().invoke(distill_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (written,) = list(models.iterdir())
    assert link.resolve() == written.resolve() and not os.path.isabs(os.readlink(link))
    assert "hard (vs LLM)" in result.output and "original (gate)" in result.output
    assert OnnxScorer.load(link).version == written.name


def test_cli_exits_3_and_writes_nothing_when_rejected(world: dict[str, Any], tmp_path: Path) -> None:
    records_file = tmp_path / "bad.jsonl"
    bad = as_records(reviews(300, seed=6, hard_share=0.0, prefix="bad"), flip=True)
    records_file.write_bytes(b"".join(orjson.dumps(distill_message(r)) + b"\n" for r in bad))
    link = tmp_path / "current"
    distill.promote(link, world["base"])
    args = ["--file", str(records_file), "--data-dir", str(world["data_dir"]), "--base-model", str(world["base"]),
            "--out", str(tmp_path / "models"), "--promote", str(link), "--new-weight", "20", "--max-new-share", "0.95",
            "--llm-accuracy", "1.0", "--report", str(tmp_path / "report.json")]  # fmt: skip
    result = CliRunner().invoke(distill_command, args, catch_exceptions=False)
    assert result.exit_code == EXIT_REJECTED, result.output
    assert "REJECTED" in result.output and list((tmp_path / "models").iterdir()) == []
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert not report["verdict"]["passed"] and report["candidate"]["path"] is None
    assert link.resolve() == world["base"].resolve()  # not promoted


# --- promotion --------------------------------------------------------------------------------------


def test_promote_flips_a_symlink_and_refuses_a_real_folder(world: dict[str, Any], tmp_path: Path) -> None:
    first, second = tmp_path / "v1", tmp_path / "v2"
    for folder in (first, second):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    link = tmp_path / "current"
    distill.promote(link, first)
    assert os.readlink(link) == "v1"
    distill.promote(link, second)
    assert os.readlink(link) == "v2" and link.resolve() == second.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1", "v2"]  # no temporary link left
    with pytest.raises(distill.DistillError, match="not a symlink"):
        distill.promote(first, second)
    with pytest.raises(distill.DistillError, match="not a model folder"):
        distill.promote(link, tmp_path)


# --- the real topic ---------------------------------------------------------------------------------


@pytest.mark.kafka
def test_read_topic_reads_every_partition_to_its_end(topics: kafka.Topics) -> None:
    topic = topics.make("distill", partitions=3)
    records = as_records(reviews(40, seed=7, hard_share=0.5, prefix="t"))
    kafka.produce(topic, [orjson.dumps(distill_message(r)) for r in records[:30]], partition=0)
    kafka.produce(topic, [orjson.dumps(distill_message(r)) for r in records[30:]] + [b"not json"], partition=1)
    conf = {"bootstrap.servers": kafka.bootstrap()}  # partition 2 stays empty and must not block the read
    values = distill.read_topic(conf, topic, timeout_s=60)
    parsed, skipped = distill.parse_records(values)
    assert skipped == 1 and sorted(r.id for r in parsed) == sorted(r.id for r in records)
    kafka.produce(topic, [orjson.dumps(distill_message(records[0]))], partition=2)
    assert len(distill.read_topic(conf, topic, timeout_s=60)) == 42  # a second read sees what came since


@pytest.mark.kafka
def test_read_topic_names_a_missing_topic() -> None:
    with pytest.raises(distill.DistillError, match="cannot read topic"):
        distill.read_topic({"bootstrap.servers": kafka.bootstrap()}, kafka.unique("missing"), timeout_s=10)


@pytest.mark.kafka
def test_cli_from_the_topic(world: dict[str, Any], topics: kafka.Topics, tmp_path: Path) -> None:
    topic, output, source = topics.make("distill", partitions=2), topics.make("labeled"), topics.make("reviews", 2)
    kafka.produce(topic, [orjson.dumps(distill_message(r)) for r in as_records(world["hard"])])
    own = reviews(60, seed=10, hard_share=0.0, prefix="own")
    kafka.produce_reviews(source, [{"id": r["id"], "text": r["text"]} for r in own])
    decided = [{"id": r["id"], "source": "small", "label": r["label"]} for r in own[:50]]
    kafka.produce(output, [orjson.dumps(d) for d in decided] + [b"not json"])
    args = ["--bootstrap", kafka.bootstrap(), "--topic", topic, "--data-dir", str(world["data_dir"]),
            "--base-model", str(world["base"]), "--out", str(tmp_path), "--vocab-size", "400"]  # fmt: skip
    env = {"SHUNT_TOPICS__OUTPUT": output, "SHUNT_TOPICS__INPUT": source}
    result = CliRunner().invoke(distill_command, args, catch_exceptions=False, env=env)
    assert result.exit_code == 0, result.output
    (written,) = list(tmp_path.iterdir())
    report = orjson.loads((written / distill.REPORT_FILE).read_bytes())
    assert report["data"]["records"] == len(world["hard"]) and report["verdict"]["passed"]
    assert report["data"]["self_labels"] == 50  # the ten reviews without a small-path output are not labels
    assert report["options"]["final_model"] == "refit"  # the fold average would shrink a new domain's weights


@pytest.mark.kafka
def test_cli_names_a_missing_output_topic_and_no_self_labels_skips_it(
    world: dict[str, Any], topics: kafka.Topics, tmp_path: Path
) -> None:
    topic = topics.make("distill")
    kafka.produce(topic, [orjson.dumps(distill_message(r)) for r in as_records(world["hard"])])
    args = ["--bootstrap", kafka.bootstrap(), "--topic", topic, "--data-dir", str(world["data_dir"]),
            "--base-model", str(world["base"]), "--out", str(tmp_path), "--vocab-size", "400",
            "--timeout", "10"]  # fmt: skip
    env = {"SHUNT_TOPICS__OUTPUT": kafka.unique("missing"), "SHUNT_TOPICS__INPUT": kafka.unique("missing")}
    with pytest.raises(distill.DistillError, match="cannot read the self-labels"):
        CliRunner().invoke(distill_command, args, catch_exceptions=False, env=env)
    result = CliRunner().invoke(distill_command, [*args, "--no-self-labels"], catch_exceptions=False, env=env)
    assert result.exit_code == 0, result.output
