"""The training function on tiny generated data: it must produce a folder the service's scorer loads."""

from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path

import numpy as np
import orjson
import pytest
import structlog
from click.testing import CliRunner

from consumer.commands import train as train_command
from consumer.offline import train as training
from consumer.small import calibration
from consumer.small.scoring import OnnxScorer

GOOD = ("great", "excellent", "love", "perfect", "wonderful")
BAD = ("awful", "broken", "refund", "waste", "terrible")
MEH = ("okay", "average", "fine", "mediocre", "neutral")
FILLER = ("the", "item", "arrived", "and", "it", "is", "was", "this", "box", "color")
TINY = training.TrainConfig(vocab_size=300, min_frequency=1, buckets=2**10, c_grid=(1.0, 10.0), folds=3, max_iter=500)


def sentences(words: tuple[str, ...], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(FILLER, 4) + rng.sample(words, 2)) + "." for _ in range(count)]


def tiny_corpus(labels: tuple[str, ...] = ("negative", "positive")) -> tuple[list[str], list[str]]:
    vocab = {"negative": BAD, "positive": GOOD, "neutral": MEH}
    texts: list[str] = []
    names: list[str] = []
    for i, label in enumerate(labels):
        texts += sentences(vocab[label], 30, seed=i)
        names += [label] * 30
    return texts, names


@pytest.fixture(scope="module")
def trained() -> training.TrainedModel:
    texts, names = tiny_corpus()
    labels = ("negative", "positive")
    return training.train(texts, training.one_hot(names, labels), labels, config=TINY)


def test_trained_folder_loads_and_agrees_with_numpy(trained: training.TrainedModel, tmp_path: Path) -> None:
    version = training.write_model_folder(tmp_path, trained, name="tiny")
    assert {p.name for p in tmp_path.iterdir()} == {"model.onnx", "tokenizer.json", "config.json", "calibration.json"}
    config = orjson.loads((tmp_path / "config.json").read_bytes())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["shunt_version"] == version
    assert config["label2id"] == {"negative": 0, "positive": 1} and config["max_tokens"] == TINY.max_tokens
    scorer = OnnxScorer.load(tmp_path)
    texts = ["this is great and perfect", "awful, a waste, refund please", ""]
    graph = scorer.logits(scorer.encode(texts))
    counts = training.count_matrix(trained.tokenizer, texts, trained.model.spec)
    np.testing.assert_allclose(graph, trained.model.logits(counts), rtol=1e-4, atol=1e-4)
    assert [p.label for p in scorer.predict(texts[:2])] == ["positive", "negative"]
    assert scorer.version == version


def test_training_is_deterministic(trained: training.TrainedModel, tmp_path: Path) -> None:
    texts, names = tiny_corpus()
    labels = ("negative", "positive")
    again = training.train(texts, training.one_hot(names, labels), labels, config=TINY)
    first = training.write_model_folder(tmp_path / "a", trained)
    assert training.write_model_folder(tmp_path / "b", again) == first


def test_soft_targets_weights_and_three_labels(tmp_path: Path) -> None:
    labels = ("negative", "neutral", "positive")
    texts, names = tiny_corpus(labels)
    hard = training.one_hot(names, labels)
    soft = 0.8 * hard + 0.2 / 3  # distillation-style targets: mostly the teacher's label
    weights = np.linspace(0.5, 1.5, len(texts))
    model = training.train(texts, soft, labels, sample_weight=weights, config=TINY)
    training.write_model_folder(tmp_path, model)
    scorer = OnnxScorer.load(tmp_path)
    assert scorer.labels == labels
    predicted = [p.label for p in scorer.predict(["love it, perfect", "mediocre and average", "broken waste"])]
    assert predicted == ["positive", "neutral", "negative"]


def test_targets_are_checked() -> None:
    with pytest.raises(ValueError, match="targets must be 2 x 2"):
        training.train(["a", "b"], np.ones((3, 2)) / 2, ("x", "y"), config=TINY)
    with pytest.raises(ValueError, match="probabilities"):
        training.train(["a", "b"], np.ones((2, 2)), ("x", "y"), config=TINY)
    with pytest.raises(ValueError, match="not among"):
        training.one_hot(["maybe"], ("x", "y"))


def test_fit_temperature_recovers_the_generating_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(4000, 3))
    probs = calibration.softmax(logits, 2.0)
    truth = np.array([rng.choice(3, p=row) for row in probs])
    fitted = calibration.fit_temperature(logits, np.eye(3)[truth])
    assert fitted == pytest.approx(2.0, rel=0.1)


def test_ece_and_deciles_on_known_cases() -> None:
    probs = np.array([[0.9, 0.1]] * 10 + [[0.4, 0.6]] * 10)
    truth = np.array([0] * 9 + [1] + [1] * 6 + [0] * 4)
    assert training.expected_calibration_error(probs, truth) == pytest.approx(0.0)
    wrong = np.array([1] * 10 + [0] * 10)
    assert training.expected_calibration_error(probs, wrong) == pytest.approx(0.5 * 0.9 + 0.5 * 0.6)
    deciles = training.confidence_deciles(probs, truth)
    assert len(deciles) == 10 and deciles[4]["accuracy"] == pytest.approx(0.9) and deciles[-1]["share"] == 1.0


def test_graph_hashes_bigrams_like_numpy() -> None:
    spec = training.FeatureSpec(vocab_size=50, buckets=16, multiplier=7)
    ids = [3, 10, 49]
    expected = [3, 10, 49, 50 + (3 * 7 + 10) % 16, 50 + (10 * 7 + 49) % 16]
    assert training.feature_ids(ids, spec).tolist() == expected
    assert training.feature_ids([], spec).tolist() == []


def test_negation_scope_marks_the_next_tokens_up_to_punctuation() -> None:
    spec = training.FeatureSpec(vocab_size=50, buckets=16, negation_window=3, negators=(5,), punctuation=(9,))
    ids = np.array([5, 1, 2, 3, 4, 5, 1, 9, 2, 5])
    assert training.negation_scope(ids, spec).astype(int).tolist() == [0, 1, 1, 1, 0, 0, 1, 0, 0, 0]
    unigrams = training.feature_ids(ids.tolist(), spec)[: len(ids)]
    assert unigrams.tolist() == [5, 67, 68, 69, 4, 5, 67, 9, 2, 5]
    assert not training.negation_scope(ids, training.FeatureSpec(vocab_size=50, buckets=16)).any()


def test_graph_marks_negation_like_numpy(tmp_path: Path) -> None:
    texts, names = tiny_corpus()
    texts += ["it is not great, really", "i don't love it at all", "not awful. perfect"] * 5
    names += ["negative", "negative", "positive"] * 5
    labels = ("negative", "positive")
    trained = training.train(texts, training.one_hot(names, labels), labels, config=TINY)
    assert trained.model.spec.negation_window == 3 and trained.model.spec.negators
    training.write_model_folder(tmp_path, trained, name="tiny")
    assert orjson.loads((tmp_path / "config.json").read_bytes())["features"]["negation_window"] == 3
    scorer = OnnxScorer.load(tmp_path)
    probe = ["not great", "not", "great. not", "i didn't love it, not at all great!", "", "no no no no love"]
    graph = scorer.logits(scorer.encode(probe))
    counts = training.count_matrix(trained.tokenizer, probe, trained.model.spec)
    np.testing.assert_allclose(graph, trained.model.logits(counts), rtol=1e-4, atol=1e-4)
    for text in probe:  # batch 1: sequences shorter than the window
        one = scorer.logits(scorer.encode([text]))
        alone = trained.model.logits(training.count_matrix(trained.tokenizer, [text], trained.model.spec))
        np.testing.assert_allclose(one, alone, rtol=1e-4, atol=1e-4)


def test_extra_data_join_every_fit_but_not_the_folds() -> None:
    texts, names = tiny_corpus()
    labels = ("negative", "positive")
    extra = training.ExtraData(["great love", "awful waste"], training.one_hot(["positive", "negative"], labels), 0.5)
    trained = training.train(texts, training.one_hot(names, labels), labels, config=TINY, extra=extra)
    assert trained.cv.oof_logits.shape == (len(texts), 2)
    plain = training.train(texts, training.one_hot(names, labels), labels, config=TINY)
    assert not np.array_equal(trained.model.table, plain.model.table)  # the extra texts did fit the weights


def test_aurc_is_the_mean_risk_over_coverage() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    truth = np.array([0, 1, 1, 1])  # by confidence: right, wrong, right, right
    assert training.aurc(probs, truth) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert training.aurc(probs, probs.argmax(axis=1)) == 0.0


def test_token_prefix_covers_what_the_model_sees(trained: training.TrainedModel) -> None:
    text = " ".join(itertools.islice(itertools.cycle(GOOD), 40))
    (prefix,) = training.token_prefix(trained.tokenizer, [text], 10)
    assert text.startswith(prefix) and len(prefix.split()) == 10
    assert training.token_prefix(trained.tokenizer, [""], 10) == [""]


def test_train_command_on_a_generated_data_folder(tmp_path: Path) -> None:
    rows: list[dict[str, str]] = []
    for domain in ("books", "kitchen"):
        for label, words in (("negative", BAD), ("positive", GOOD)):
            for i, text in enumerate(sentences(words, 25, seed=len(rows))):
                rows.append({"id": f"{domain}-{label}-{i}", "text": text, "label": label, "domain": domain})
    (tmp_path / "amazon-reviews-train.jsonl").write_bytes(b"\n".join(orjson.dumps(row) for row in rows))
    saved = structlog.get_config()
    try:
        args = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "model"), "--domains", "books"]
        args += ["--vocab-size", "200", "--buckets", "1024"]
        result = CliRunner().invoke(train_command.command, args)
    finally:
        structlog.configure(**saved)
    assert result.exit_code == 0, result.output
    metrics = orjson.loads((tmp_path / "model" / "metrics.json").read_bytes())
    assert metrics["data"]["domains"] == ["books"] and metrics["data"]["test"] == 10
    assert set(metrics["baseline"]) == {"full_text", "same_prefix"} and len(metrics["test"]["deciles"]) == 10
    assert OnnxScorer.load(tmp_path / "model").predict(["great, love it"])[0].label == "positive"


def test_the_shipped_model_is_the_average_of_the_chosen_c_fold_models_unless_refit() -> None:
    texts, names = tiny_corpus()
    labels = ("negative", "positive")
    targets = training.one_hot(names, labels)
    averaged = training.train(texts, targets, labels, config=TINY)
    assert TINY.final_model == "fold_average"
    spec = averaged.model.spec
    counts = training.count_matrix(averaged.tokenizer, texts, spec)
    folds = training.fold_ids(targets, TINY.folds, TINY.seed)
    config = dataclasses.replace(TINY, final_model="refit")
    models = [
        training.fit_linear(counts[folds != k], targets[folds != k], np.ones(int((folds != k).sum())), averaged.cv.c,
                            config, spec=spec)
        for k in range(TINY.folds)
    ]  # fmt: skip
    expected = training.average_models(models)
    np.testing.assert_allclose(averaged.model.table, expected.table, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(averaged.model.bias, expected.bias, rtol=1e-6, atol=1e-7)
    refit = training.train(texts, targets, labels, config=config, tokenizer=averaged.tokenizer)
    assert refit.temperature == averaged.temperature and not np.allclose(refit.model.table, averaged.model.table)
    with pytest.raises(ValueError, match="no models"):
        training.average_models([])


def test_c_is_chosen_by_accuracy_or_by_calibrated_log_loss() -> None:
    # Two made-up C: "1" is right more often but sure of its mistakes and unsure when right; "2" is wrong a
    # little more often, only ever unsure when wrong. Accuracy picks 1, calibrated log-loss picks 2.
    n = 100
    truth = np.arange(n) % 2
    targets = np.eye(2)[truth]

    def logits_fn(fit_idx: np.ndarray, eval_idx: np.ndarray, c: float) -> np.ndarray:
        sign = np.where(truth[eval_idx] == 1, 1.0, -1.0)
        wrong = eval_idx % 10 == 0 if c == 1.0 else eval_idx % 10 <= 1
        margin = np.where(wrong, -3.0, 0.3) if c == 1.0 else np.where(wrong, -0.1, 3.0)
        z = sign * margin
        return np.stack([-z / 2, z / 2], axis=1)

    config = training.TrainConfig(c_grid=(1.0, 2.0), folds=5)
    by_accuracy = training.cross_validate(logits_fn, targets, config, lambda _m: None)
    assert by_accuracy.c == 1.0 and by_accuracy.accuracy == {1.0: 0.9, 2.0: 0.8}
    by_loss = training.cross_validate(
        logits_fn, targets, dataclasses.replace(config, select_c_by="nll"), lambda _m: None
    )
    assert by_loss.c == 2.0 and by_loss.nll[2.0] < by_loss.nll[1.0]
    np.testing.assert_array_equal(by_loss.oof_logits.argmax(axis=1) == truth, np.arange(n) % 10 > 1)
