"""The small model: the shipped default, a structurally different ONNX classifier built here, load errors,
hostile texts, the async stage and the ``shunt score`` command."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import structlog
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from consumer.commands import score as score_command
from consumer.config import DEFAULT_MODEL_DIR
from consumer.errors import ModelLoadError
from consumer.records import Origin, Prediction, Review
from consumer.small.scoring import OnnxScorer, Scorer, ScoringStage

POSITIVE = [
    "Absolutely wonderful. I love it and use it every day; excellent quality, highly recommended!",
    "Great value, works perfectly and arrived fast. Five stars, would buy again.",
    "One of the best books I have read this year: beautifully written and moving.",
]
NEGATIVE = [
    "Terrible. It broke after two days and the company refused a refund. Complete waste of money.",
    "Do not buy this. Poor quality, cheap plastic, and it stopped working within a week.",
    "Boring and badly acted; the worst movie I have seen in years. Very disappointed.",
]
HOSTILE = [
    "",
    "   \n\t ",
    "word " * 200_000,  # 1 MB of text
    "x" * 1_000_000,  # 1 MB without a single space
    "这个产品非常好，我很喜欢。" * 20,
    "هذا المنتج رائع جدا وأنا أحبه",
    "😀🔥👍🏽💔" * 50,
    "[PAD] [UNK] [CLS] [SEP] <pad>",
]
TOY_LABELS = ("sad", "meh", "happy")
TOY_WORDS = {"good": 2, "great": 2, "bad": 0, "awful": 0, "okay": 1, "so": 1}


# --- a structurally different classifier, built here: WordLevel + [CLS]/[SEP], token_type_ids, 3 labels ---


def toy_tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab |= {word: 4 + i for i, word in enumerate(TOY_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer


def toy_graph(*, extra_input: bool = False) -> bytes:
    """logits = masked mean over positions of (word embedding + type embedding): [batch, 3]."""
    embedding = np.zeros((4 + len(TOY_WORDS), 3), dtype=np.float32)
    for i, label_index in enumerate(TOY_WORDS.values()):
        embedding[4 + i, label_index] = 8.0
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["words"]),
        helper.make_node("Gather", ["type_embedding", "token_type_ids"], ["types"]),
        helper.make_node("Add", ["words", "types"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "axis_2"], ["mask_3d"]),
        helper.make_node("Mul", ["tokens", "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_3d", "axis_1"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["logits" if not extra_input else "base"]),
    ]
    inputs = [_int_input(name) for name in ("input_ids", "attention_mask", "token_type_ids")]
    if extra_input:
        inputs.append(_int_input("position_ids"))
        nodes += [
            helper.make_node("Cast", ["position_ids"], ["positions"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["positions", "axis_1"], ["position_sum"], keepdims=1),
            helper.make_node("Mul", ["position_sum", "zero"], ["nothing"]),
            helper.make_node("Add", ["base", "nothing"], ["logits"]),
        ]
    initializers = [
        numpy_helper.from_array(embedding, "embedding"),
        numpy_helper.from_array(np.full((2, 3), 0.1, dtype=np.float32), "type_embedding"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis_2"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(nodes, "toy", inputs, [output], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return bytes(model.SerializeToString())


def _int_input(name: str) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])


def write_toy(folder: Path, *, labels: Sequence[str] = TOY_LABELS, extra_input: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(toy_graph(extra_input=extra_input))
    toy_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"id2label": {str(i): label for i, label in enumerate(labels)}, "model_type": "toy"}
    (folder / "config.json").write_bytes(orjson.dumps(config))
    return folder


@pytest.fixture(scope="module")
def default_scorer() -> OnnxScorer:
    return OnnxScorer.load(DEFAULT_MODEL_DIR)


@pytest.fixture
def toy(tmp_path: Path) -> OnnxScorer:
    return OnnxScorer.load(write_toy(tmp_path / "toy"))


# --- the shipped default model ---


def test_default_model_gets_obvious_sentiment_right(default_scorer: OnnxScorer) -> None:
    predictions = default_scorer.predict(POSITIVE + NEGATIVE)
    assert [p.label for p in predictions] == ["positive"] * 3 + ["negative"] * 3
    for p in predictions:
        assert p.confidence == max(p.probs.values()) and sum(p.probs.values()) == pytest.approx(1.0)
        assert p.model_version == default_scorer.version and p.model_version.startswith("shunt-sentiment-")


def test_default_model_is_calibrated_and_versioned(default_scorer: OnnxScorer) -> None:
    assert default_scorer.labels == ("negative", "positive")
    assert 0.2 < default_scorer.temperature < 5.0
    assert isinstance(default_scorer, Scorer)


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: f"{len(t)}:{t[:6]!r}")
def test_hostile_texts_score_without_crashing(default_scorer: OnnxScorer, toy: OnnxScorer, text: str) -> None:
    for scorer in (default_scorer, toy):
        (prediction,) = scorer.predict([text])
        assert prediction.label in scorer.labels
        assert sum(prediction.probs.values()) == pytest.approx(1.0) and 0 < prediction.confidence <= 1


def test_empty_text_gets_the_prior_and_mixed_batches_work(default_scorer: OnnxScorer) -> None:
    empty, blank, real = default_scorer.predict(["", "  ", POSITIVE[0]])
    assert empty.probs == blank.probs and empty.confidence < 0.75  # the bias alone: never a confident label
    assert real.label == "positive"
    assert default_scorer.predict([]) == []


def test_padding_does_not_change_a_prediction(default_scorer: OnnxScorer, toy: OnnxScorer) -> None:
    for scorer in (default_scorer, toy):
        alone = scorer.predict(["good so okay"])[0]
        batched = scorer.predict(["good so okay", "bad " * 300, ""])[0]
        assert batched.probs == pytest.approx(alone.probs, abs=1e-6)


# --- a user's own export, structurally different ---


def test_a_different_onnx_classifier_loads_and_scores(toy: OnnxScorer) -> None:
    assert toy.labels == TOY_LABELS and toy.version.startswith("onnx-")
    feeds = toy.encode(["good"])
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert feeds["input_ids"].tolist() == [[2, 4, 3]]  # [CLS] good [SEP]: the tokenizer's own template
    labels = [p.label for p in toy.predict(["good great", "bad awful awful", "okay so", "zzz unknown"])]
    assert labels[:3] == ["happy", "sad", "meh"]


def test_truncation_and_calibration_file(tmp_path: Path) -> None:
    folder = write_toy(tmp_path / "toy")
    (folder / "calibration.json").write_bytes(orjson.dumps({"temperature": 4.0}))
    hot, cool = OnnxScorer.load(folder), OnnxScorer.load(write_toy(tmp_path / "plain"))
    assert hot.predict(["great"])[0].confidence < cool.predict(["great"])[0].confidence
    short = OnnxScorer.load(folder, max_tokens=4)
    assert short.encode(["bad " * 50])["input_ids"].shape == (1, 4)
    assert short.predict(["good good bad bad bad"])[0].label == "happy"  # only [CLS] good good [SEP] is seen


def test_padding_in_the_tokenizer_file_becomes_pad_to_longest(tmp_path: Path) -> None:
    folder = write_toy(tmp_path / "toy")
    tokenizer = toy_tokenizer()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=64)  # a fixed-length export
    tokenizer.save(str(folder / "tokenizer.json"))
    feeds = OnnxScorer.load(folder).encode(["good", "good bad okay"])
    assert feeds["input_ids"].tolist() == [[2, 4, 3, 0, 0], [2, 4, 6, 8, 3]]
    assert feeds["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert feeds["token_type_ids"].tolist() == [[0] * 5, [0] * 5]


def test_version_comes_from_config_when_present(tmp_path: Path) -> None:
    folder = write_toy(tmp_path / "toy")
    (folder / "config.json").write_bytes(
        orjson.dumps({"id2label": {str(i): x for i, x in enumerate(TOY_LABELS)}, "shunt_version": "v7"})
    )
    assert OnnxScorer.load(folder).version == "v7"


# --- load errors name the folder and the problem ---


@pytest.mark.parametrize("missing", ["model.onnx", "tokenizer.json", "config.json"])
def test_missing_file_fails_at_load(tmp_path: Path, missing: str) -> None:
    folder = write_toy(tmp_path / "toy")
    (folder / missing).unlink()
    with pytest.raises(ModelLoadError, match=f"{folder}.* is missing {missing}"):
        OnnxScorer.load(folder)


def test_unexpected_graph_input_fails_at_load(tmp_path: Path) -> None:
    folder = write_toy(tmp_path / "toy", extra_input=True)
    with pytest.raises(ModelLoadError, match=r"toy.*cannot feed: \['position_ids'\]"):
        OnnxScorer.load(folder)


def test_id2label_that_disagrees_with_the_output_fails_at_load(tmp_path: Path) -> None:
    folder = write_toy(tmp_path / "toy", labels=("negative", "positive"))
    with pytest.raises(ModelLoadError, match=r"id2label has 2 labels but .*'logits' output has shape \[1, 3\]"):
        OnnxScorer.load(folder)


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("tokenizer.json", b"{not a tokenizer", "unreadable tokenizer.json"),
        ("config.json", b"[]", "config.json must hold a JSON object"),
        ("config.json", b'{"id2label": {"0": "a", "2": "b"}}', "id2label keys must be 0..1"),
        ("calibration.json", b'{"temperature": -1}', "temperature must be a positive number"),
        ("model.onnx", b"not a graph", "model.onnx is not a loadable ONNX graph"),
    ],
)
def test_broken_files_fail_at_load(tmp_path: Path, filename: str, content: bytes, message: str) -> None:
    folder = write_toy(tmp_path / "toy")
    (folder / filename).write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        OnnxScorer.load(folder)


def test_missing_folder_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxScorer.load(tmp_path / "nowhere")


# --- the async stage ---


class FakeScorer:
    """Records the thread it ran on; blocks until released when asked to."""

    def __init__(self, version: str, labels: tuple[str, ...] = ("negative", "positive")) -> None:
        self.version, self.labels = version, labels
        self.threads: list[int] = []
        self.started, self.release = threading.Event(), threading.Event()
        self.release.set()

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        self.threads.append(threading.get_ident())
        self.started.set()
        assert self.release.wait(10), "the test never released the scorer"
        return [Prediction("positive", 0.9, {"negative": 0.1, "positive": 0.9}, self.version) for _ in texts]


def reviews(count: int) -> list[Review]:
    return [Review(id=f"r{i}", text=f"text {i}", origin=Origin("reviews", 0, i)) for i in range(count)]


async def test_stage_scores_off_the_event_loop() -> None:
    scorer = FakeScorer("a")
    scorer.release.clear()
    stage = ScoringStage(scorer)
    task = asyncio.create_task(stage.score(reviews(3)))
    # The loop keeps running while predict blocks on its worker thread.
    assert await asyncio.to_thread(scorer.started.wait, 10)
    assert not task.done()
    scorer.release.set()
    scored = await task
    assert [s.review.id for s in scored] == ["r0", "r1", "r2"]
    assert scorer.threads == [scorer.threads[0]] and scorer.threads[0] != threading.get_ident()
    stage.close()


async def test_stage_swaps_between_batches_and_closes() -> None:
    first, second = FakeScorer("a"), FakeScorer("b")
    stage = ScoringStage(first)
    assert (await stage.score(reviews(1)))[0].prediction.model_version == "a"
    assert stage.swap(second) is first and stage.scorer is second
    assert (await stage.score(reviews(2)))[1].prediction.model_version == "b"
    assert await stage.score([]) == []
    with pytest.raises(ModelLoadError, match="labels"):
        stage.swap(FakeScorer("c", labels=("x", "y", "z")))
    stage.close()
    stage.close()
    with pytest.raises(RuntimeError, match="closed"):
        await stage.score(reviews(1))


async def test_stage_with_the_real_model(default_scorer: OnnxScorer) -> None:
    stage = ScoringStage(default_scorer)
    batch = [Review(id=str(i), text=text, origin=Origin("reviews", 0, i)) for i, text in enumerate(POSITIVE)]
    scored = await stage.score(batch)
    assert {s.prediction.label for s in scored} == {"positive"}
    stage.close()


# --- shunt score ---


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """The command configures structlog for its process; put the test process's configuration back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_score_command_prints_one_json_line(keep_logging: None) -> None:
    result = CliRunner().invoke(score_command.command, [POSITIVE[1]])
    assert result.exit_code == 0, result.output
    line = orjson.loads(result.stdout)
    assert set(line) == {"id", "label", "confidence", "probs"} and line["label"] == "positive"


def test_score_command_scores_a_file(tmp_path: Path, keep_logging: None) -> None:
    source = tmp_path / "in.jsonl"
    rows = [{"id": "a", "text": NEGATIVE[0]}, {"text": POSITIVE[0]}, {"id": 7, "text": ""}]
    source.write_bytes(b"\n".join(orjson.dumps(row) for row in rows[:2]) + b"\n\n" + orjson.dumps(rows[2]))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(score_command.command, ["--file", str(source), "--out", str(out), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["id"] for line in lines] == ["a", "2", "7"]  # no id: its line number
    assert [line["label"] for line in lines[:2]] == ["negative", "positive"]


def test_score_command_needs_text_or_file(keep_logging: None) -> None:
    result = CliRunner().invoke(score_command.command, [])
    assert result.exit_code == 2 and "either TEXT or --file" in result.output
