"""Train, calibrate and export the default small model: a linear classifier over subword unigrams and
hashed subword bigrams, computed inside the ONNX graph from ``input_ids``.

Why this shape: the small model sees every review, so it must cost far less than tokenisation. The graph
is a gather from one weight table, a masked sum and one division; all the learning happens here, offline:

* features: every token id ``t`` (a unigram) and, for each adjacent pair ``(a, b)``, the hashed bigram
  ``V + (a * M + b) mod H`` (V = vocabulary size, H = buckets, M = an odd multiplier);
* per-feature scale ``s = idf * |NB log-count ratio| ** power`` (NBSVM-style; it helps on sentiment);
* document vector ``x = sum_f count_f * s_f * e_f / sqrt(sum_f count_f * s_f ** 2)``, a length
  normalisation that needs no de-duplication in the graph;
* a (multinomial) logistic regression on ``x``; its weights and ``s`` fold into one table whose columns
  are ``s * W`` (one per label) and ``s ** 2`` (for the norm).

Soft targets (n x C probabilities) and per-sample weights are accepted, so the same code serves L4S
distillation. The temperature is fitted on out-of-fold logits, never on data that fitted the weights.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import orjson
import structlog
from onnx import TensorProto, helper, numpy_helper
from scipy import sparse  # type: ignore[import-untyped, unused-ignore]
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from consumer.small.calibration import RELIABILITY_BINS, ece_of, fit_temperature, nll, softmax

log = structlog.get_logger(__name__)

Floats = npt.NDArray[np.float64]
Ids = npt.NDArray[np.int64]
Ints = npt.NDArray[np.intp]
Progress = Callable[[str], None]
LogitsFn = Callable[[Ints, Ints, float], Floats]

MODEL_TYPE = "shunt-hashed-ngram-linear"
PAD, UNK = "[PAD]", "[UNK]"
OPSET = 17  # with IR version 8: any onnxruntime >= 1.12 runs the graph; axes are inputs from opset 13
_NORM_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """How token ids become feature rows; the ONNX graph and :func:`count_matrix` must agree on it."""

    vocab_size: int
    buckets: int = 2**18
    multiplier: int = 1_000_003
    max_tokens: int = 256

    @property
    def width(self) -> int:
        return self.vocab_size + self.buckets


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters; the defaults were chosen by 5-fold cross-validation on the training split only."""

    vocab_size: int = 20_000
    min_frequency: int = 2
    buckets: int = 2**18
    max_tokens: int = 256
    c_grid: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0)
    folds: int = 5
    nb_power: float = 0.5
    nb_alpha: float = 1.0
    seed: int = 0
    max_iter: int = 5_000


@dataclass(frozen=True, slots=True)
class LinearModel:
    """The folded model: ``logits = table[:, :C] summed / sqrt(table[:, C] summed) + bias``."""

    spec: FeatureSpec
    table: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]

    def logits(self, counts: Any) -> Floats:
        """Logits for a sparse count matrix from :func:`count_matrix` (mirrors the ONNX graph)."""
        summed = np.asarray(counts @ self.table.astype(np.float64))
        num, den = summed[:, :-1], summed[:, -1:]
        out: Floats = num / np.sqrt(den + _NORM_EPS) + self.bias
        return out


@dataclass(frozen=True, slots=True)
class CrossValidation:
    """What k-fold cross-validation chose, with the out-of-fold logits used for the temperature."""

    c: float
    accuracy: dict[float, float]
    oof_logits: Floats


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """Everything :func:`write_model_folder` needs, plus the cross-validation record."""

    labels: tuple[str, ...]
    tokenizer: Tokenizer
    model: LinearModel
    temperature: float
    cv: CrossValidation
    config: TrainConfig = field(default_factory=TrainConfig)


# --- targets and tokenizer -------------------------------------------------------------------------


def one_hot(values: Sequence[str], labels: Sequence[str]) -> Floats:
    """Hard labels as an n x C target matrix in the order of ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among {list(labels)}")
    targets = np.zeros((len(values), len(labels)))
    targets[np.arange(len(values)), [index[v] for v in values]] = 1.0
    return targets


def train_tokenizer(texts: Sequence[str], vocab_size: int = 20_000, min_frequency: int = 2) -> Tokenizer:
    """A lowercasing, accent-stripping BPE tokenizer without [CLS]/[SEP] (a bag model needs neither).

    BPE rather than WordPiece because HF's WordPiece trainer is not deterministic (huggingface/tokenizers
    #1794: ``##`` pieces get ids in hash-map order, which breaks merge ties differently per run); BPE
    without a continuing-subword prefix trains the same vocabulary every time. ``ignore_merges`` looks a
    whole word up before applying merges: the same ids on our data, ~8% faster. The Whitespace
    pre-tokenizer (``\\w+|[^\\w\\s]+``) keeps runs like ``!!!`` or ``:(`` as one token and is ~30% faster
    than BERT's; tokenisation bounds the whole small path, so both matter.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK, ignore_merges=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode_ids(tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids per text, truncated exactly as the scorer truncates them."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    try:
        return [encoding.ids for encoding in tokenizer.encode_batch_fast(list(texts))]
    finally:
        tokenizer.no_truncation()


def token_prefix(tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int) -> list[str]:
    """The part of each text that the first ``max_tokens`` tokens cover: what the model gets to see."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    try:
        encodings = tokenizer.encode_batch(list(texts))
    finally:
        tokenizer.no_truncation()
    return [
        text[: encoding.offsets[-1][1]] if encoding.offsets else ""
        for text, encoding in zip(texts, encodings, strict=True)
    ]


def feature_ids(ids: Sequence[int], spec: FeatureSpec) -> Ids:
    """Unigram ids followed by hashed bigram ids, as the ONNX graph computes them."""
    tokens = np.asarray(ids, dtype=np.int64)
    bigrams = spec.vocab_size + (tokens[:-1] * spec.multiplier + tokens[1:]) % spec.buckets
    out: Ids = np.concatenate([tokens, bigrams])
    return out


def count_matrix(tokenizer: Tokenizer, texts: Sequence[str], spec: FeatureSpec) -> Any:
    """A sparse n x width matrix of feature counts."""
    rows = [feature_ids(ids, spec) for ids in encode_ids(tokenizer, texts, spec.max_tokens)]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=indptr[1:])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    data = np.ones(len(indices), dtype=np.float64)
    matrix = sparse.csr_matrix((data, indices, indptr), shape=(len(rows), spec.width))
    matrix.sum_duplicates()
    return matrix


# --- fitting ----------------------------------------------------------------------------------------


def feature_scale(counts: Any, targets: Floats, weights: Floats, power: float, alpha: float) -> Floats:
    """idf times the largest one-vs-rest NB log-count ratio, raised to ``power``; unseen features get 0."""
    present = counts.copy()
    present.data[:] = 1.0
    n = counts.shape[0]
    df = np.asarray(present.sum(axis=0)).ravel()
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    per_class = np.asarray(present.T @ (targets * weights[:, None]))  # width x C presence mass
    total = per_class.sum(axis=1, keepdims=True)
    p = alpha + per_class
    q = alpha + (total - per_class)
    ratio = np.log(p / p.sum(axis=0)) - np.log(q / q.sum(axis=0))
    scale: Floats = np.where(df > 0, idf * np.abs(ratio).max(axis=1) ** power, 0.0)
    return scale


def normalise(counts: Any, scale: Floats) -> Any:
    """``count * s / sqrt(sum(count * s**2))`` per row: the graph's length normalisation."""
    norms = np.sqrt(np.asarray(counts @ (scale**2)).ravel() + _NORM_EPS)
    return (sparse.diags(1.0 / norms) @ counts @ sparse.diags(scale)).tocsr()


def fit_logistic(x: Any, targets: Floats, weights: Floats, c: float, max_iter: int) -> tuple[Floats, Floats]:
    """Weights (width x C) and bias (C) of a logistic regression on soft targets.

    sklearn takes hard labels only, so each sample appears once per class, weighted by its target
    probability times its own weight; the cross-entropy this minimises is exactly the soft-target one.
    """
    n, n_classes = targets.shape
    cls, rows = np.nonzero(targets.T > 0)
    sample_weight = targets[rows, cls] * weights[rows]
    missing = sorted(set(range(n_classes)) - set(cls.tolist()))
    if missing:
        raise ValueError(f"label index(es) {missing} have no training weight; every label needs examples")
    model = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x[rows], cls, sample_weight=sample_weight)
    if caught:
        log.warning("training.not_converged", c=c, max_iter=max_iter, samples=n)
    coef = np.asarray(model.coef_, dtype=np.float64).T
    bias = np.asarray(model.intercept_, dtype=np.float64)
    if n_classes == 2:  # sklearn keeps one logit for two classes; spread it symmetrically over both
        return np.hstack([-coef / 2, coef / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    return coef, bias


def fit_linear(counts: Any, targets: Floats, weights: Floats, c: float, config: TrainConfig) -> LinearModel:
    """Fit scale and weights on ``counts`` and fold them into one table."""
    scale = feature_scale(counts, targets, weights, config.nb_power, config.nb_alpha)
    coef, bias = fit_logistic(normalise(counts, scale), targets, weights, c, config.max_iter)
    table = np.hstack([coef * scale[:, None], (scale**2)[:, None]]).astype(np.float32)
    spec = FeatureSpec(counts.shape[1] - config.buckets, config.buckets, max_tokens=config.max_tokens)
    return LinearModel(spec=spec, table=table, bias=bias.astype(np.float32))


def fold_ids(targets: Floats, folds: int, seed: int) -> Ints:
    """Fold number per sample, stratified by the argmax class, from a keyed hash (the same everywhere)."""
    out = np.zeros(len(targets), dtype=np.intp)
    hard = targets.argmax(axis=1)
    for cls in np.unique(hard):
        members = np.flatnonzero(hard == cls)
        order = sorted(members.tolist(), key=lambda i: hashlib.blake2b(f"{seed}:{i}".encode()).digest())
        out[order] = np.arange(len(order)) % folds
    return out


def cross_validate(logits_fn: LogitsFn, targets: Floats, config: TrainConfig, progress: Progress) -> CrossValidation:
    """Pick C by k-fold accuracy; keep that C's out-of-fold logits for the temperature."""
    folds = fold_ids(targets, config.folds, config.seed)
    hard = targets.argmax(axis=1)
    best: tuple[float, float, Floats] | None = None
    accuracy: dict[float, float] = {}
    for c in config.c_grid:
        oof = np.zeros_like(targets)
        for k in range(config.folds):
            fit_idx, eval_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            oof[eval_idx] = logits_fn(fit_idx, eval_idx, c)
        accuracy[c] = float((oof.argmax(axis=1) == hard).mean())
        progress(f"C={c:g}: {config.folds}-fold accuracy {accuracy[c]:.4f}")
        if best is None or accuracy[c] > best[1]:
            best = (c, accuracy[c], oof)
    if best is None:
        raise ValueError("TrainConfig.c_grid is empty")
    return CrossValidation(c=best[0], accuracy=accuracy, oof_logits=best[2])


def train(
    texts: Sequence[str],
    targets: Floats,
    labels: Sequence[str],
    *,
    sample_weight: Floats | None = None,
    config: TrainConfig | None = None,
    tokenizer: Tokenizer | None = None,
    progress: Progress | None = None,
) -> TrainedModel:
    """Train tokenizer (unless given), choose C by k-fold, fit on everything, calibrate on out-of-fold logits.

    ``targets`` is n x C probabilities (use :func:`one_hot` for hard labels), columns in ``labels`` order.
    """
    config = config or TrainConfig()
    say = progress or (lambda _message: None)
    targets = _check_targets(targets, len(texts), len(labels))
    weights = np.ones(len(texts)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if tokenizer is None:
        say(f"training a BPE tokenizer (vocab {config.vocab_size}) on {len(texts)} texts")
        tokenizer = train_tokenizer(texts, config.vocab_size, config.min_frequency)
    spec = FeatureSpec(tokenizer.get_vocab_size(), config.buckets, max_tokens=config.max_tokens)
    counts = count_matrix(tokenizer, texts, spec)

    def fold_logits(fit_idx: Ints, eval_idx: Ints, c: float) -> Floats:
        return fit_linear(counts[fit_idx], targets[fit_idx], weights[fit_idx], c, config).logits(counts[eval_idx])

    cv = cross_validate(fold_logits, targets, config, say)
    temperature = fit_temperature(cv.oof_logits, targets)
    say(f"chose C={cv.c:g}; temperature {temperature:.3f} from out-of-fold logits; fitting on all data")
    model = fit_linear(counts, targets, weights, cv.c, config)
    log.info("training.done", samples=len(texts), labels=list(labels), c=cv.c, temperature=temperature)
    return TrainedModel(tuple(labels), tokenizer, model, temperature, cv, config)


def _check_targets(targets: Floats, n: int, n_labels: int) -> Floats:
    targets = np.asarray(targets, dtype=np.float64)
    if targets.shape != (n, n_labels):
        raise ValueError(f"targets must be {n} x {n_labels} (texts x labels), got {targets.shape}")
    if n_labels < 2 or np.any(targets < 0) or not np.allclose(targets.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("targets must be probabilities over at least two labels (rows summing to 1)")
    return targets


# --- calibration and evaluation ---------------------------------------------------------------------


def expected_calibration_error(probs: Floats, truth: Ints, bins: int = RELIABILITY_BINS) -> float:
    """ECE of a probability matrix (:func:`consumer.small.calibration.ece_of`)."""
    return ece_of(probs, truth, bins)


def confidence_deciles(probs: Floats, truth: Ints) -> list[dict[str, float]]:
    """Accuracy of the 10%, 20%, ... 100% most confident predictions, with the confidence at each cut."""
    confidence = probs.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    correct = (probs.argmax(axis=1) == truth)[order]
    out = []
    for decile in range(1, 11):
        k = max(1, math.ceil(len(order) * decile / 10))
        out.append(
            {
                "share": decile / 10,
                "accuracy": float(correct[:k].mean()),
                "min_confidence": float(confidence[order[k - 1]]),
            }
        )
    return out


def evaluate(logits: Floats, truth: Ints, temperature: float) -> dict[str, Any]:
    """Accuracy, NLL and ECE before and after temperature scaling, and the confidence deciles after."""
    targets = np.eye(logits.shape[1])[truth]
    raw, tempered = softmax(logits), softmax(logits, temperature)
    return {
        "n": len(truth),
        "accuracy": float((logits.argmax(axis=1) == truth).mean()),
        "temperature": temperature,
        "nll_before": nll(logits, targets, 1.0),
        "nll_after": nll(logits, targets, temperature),
        "ece_before": expected_calibration_error(raw, truth),
        "ece_after": expected_calibration_error(tempered, truth),
        "deciles": confidence_deciles(tempered, truth),
        "thresholds": threshold_coverage(tempered, truth),
    }


def threshold_coverage(
    probs: Floats, truth: Ints, thresholds: Sequence[float] = (0.8, 0.9, 0.95, 0.99)
) -> list[dict[str, float]]:
    """For each routing threshold: the share the small model keeps (confidence >= t) and its accuracy there."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == truth
    out = []
    for threshold in thresholds:
        kept = confidence >= threshold
        accuracy = float(correct[kept].mean()) if kept.any() else float("nan")
        out.append({"threshold": threshold, "coverage": float(kept.mean()), "accuracy": accuracy})
    return out


# --- the TF-IDF + logistic regression baseline ------------------------------------------------------


def tfidf_baseline(
    train_texts: Sequence[str],
    train_targets: Floats,
    test_texts: Sequence[str],
    config: TrainConfig,
    progress: Progress | None = None,
) -> tuple[Floats, float, CrossValidation]:
    """Word 1-2 gram TF-IDF (sublinear tf, full text) + logistic regression, tuned and calibrated like ours.

    Returns the test logits, the out-of-fold temperature and the cross-validation record.
    """
    texts = np.asarray(train_texts, dtype=object)
    vectorised: dict[bytes, tuple[Any, Any]] = {}  # one vectorizer per fold, shared by every C

    def features(fit_texts: Any, eval_texts: Any, key: bytes) -> tuple[Any, Any]:
        if key not in vectorised:
            vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
            vectorised[key] = (vectorizer.fit_transform(fit_texts), vectorizer.transform(eval_texts))
        return vectorised[key]

    def fit_and_score(x_fit: Any, fit_targets: Floats, x_eval: Any, c: float) -> Floats:
        coef, bias = fit_logistic(x_fit, fit_targets, np.ones(x_fit.shape[0]), c, config.max_iter)
        out: Floats = np.asarray(x_eval @ coef) + bias
        return out

    def fold_logits(fit_idx: Ints, eval_idx: Ints, c: float) -> Floats:
        x_fit, x_eval = features(texts[fit_idx], texts[eval_idx], eval_idx.tobytes())
        return fit_and_score(x_fit, train_targets[fit_idx], x_eval, c)

    cv = cross_validate(fold_logits, train_targets, config, progress or (lambda _message: None))
    temperature = fit_temperature(cv.oof_logits, train_targets)
    x_train, x_test = features(texts, list(test_texts), b"all")
    return fit_and_score(x_train, train_targets, x_test, cv.c), temperature, cv


# --- export -----------------------------------------------------------------------------------------


def build_graph(model: LinearModel, num_labels: int) -> onnx.ModelProto:
    """The ONNX graph: (input_ids, attention_mask) -> logits [batch, num_labels]."""
    graph = helper.make_graph(
        [*_feature_nodes(), *_pooling_nodes()],
        MODEL_TYPE,
        [_int_input("input_ids"), _int_input("attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels])],
        initializer=_initializers(model, num_labels),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="data-shunt")
    proto.ir_version = 8  # onnx's newest IR would needlessly lock out older runtimes
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _feature_nodes() -> list[onnx.NodeProto]:
    """feature_ids = [ids, vocab + (ids[:, :-1] * multiplier + ids[:, 1:]) mod buckets], and their mask."""
    return [
        *_slice_pair("input_ids", "ids_a", "ids_b"),
        *_slice_pair("attention_mask", "mask_a", "mask_b"),
        helper.make_node("Mul", ["ids_a", "multiplier"], ["ids_am"]),
        helper.make_node("Add", ["ids_am", "ids_b"], ["pair"]),
        helper.make_node("Mod", ["pair", "buckets"], ["bucket"]),
        helper.make_node("Add", ["bucket", "vocab"], ["bigram_ids"]),
        helper.make_node("Mul", ["mask_a", "mask_b"], ["bigram_mask"]),
        helper.make_node("Concat", ["input_ids", "bigram_ids"], ["feature_ids"], axis=1),
        helper.make_node("Concat", ["attention_mask", "bigram_mask"], ["feature_mask_i"], axis=1),
        helper.make_node("Cast", ["feature_mask_i"], ["feature_mask"], to=TensorProto.FLOAT),
    ]


def _pooling_nodes() -> list[onnx.NodeProto]:
    """logits = (mask @ table[feature_ids])[:, :C] / sqrt((...)[:, C] + eps) + bias."""
    return [
        helper.make_node("Unsqueeze", ["feature_mask", "axis_1"], ["feature_mask_3d"]),
        helper.make_node("Gather", ["table", "feature_ids"], ["rows"], axis=0),
        # [b, 1, n] x [b, n, C+1]: the masked sum over positions as one batched matmul
        helper.make_node("MatMul", ["feature_mask_3d", "rows"], ["summed_3d"]),
        helper.make_node("Squeeze", ["summed_3d", "axis_1"], ["summed"]),
        helper.make_node("Slice", ["summed", "zero", "n_labels", "axis_1"], ["numerator"]),
        helper.make_node("Slice", ["summed", "n_labels", "n_labels_1", "axis_1"], ["norm_sq"]),
        helper.make_node("Add", ["norm_sq", "eps"], ["norm_sq_eps"]),
        helper.make_node("Sqrt", ["norm_sq_eps"], ["norm"]),
        helper.make_node("Div", ["numerator", "norm"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logits"]),
    ]


def _slice_pair(name: str, head: str, tail: str) -> list[onnx.NodeProto]:
    """``x[:, :-1]`` and ``x[:, 1:]``: the left and right members of each adjacent pair."""
    return [
        helper.make_node("Slice", [name, "zero", "minus_one", "axis_1"], [head]),
        helper.make_node("Slice", [name, "one", "int_max", "axis_1"], [tail]),
    ]


def _int_input(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])


def _initializers(model: LinearModel, num_labels: int) -> list[onnx.TensorProto]:
    spec = model.spec
    ints = {
        "zero": 0,
        "one": 1,
        "minus_one": -1,
        "int_max": np.iinfo(np.int64).max,
        "axis_1": 1,
        "n_labels": num_labels,
        "n_labels_1": num_labels + 1,
    }
    tensors = [numpy_helper.from_array(np.array([v], dtype=np.int64), name) for name, v in ints.items()]
    scalars = {"multiplier": spec.multiplier, "buckets": spec.buckets, "vocab": spec.vocab_size}
    tensors += [numpy_helper.from_array(np.array(v, dtype=np.int64), name) for name, v in scalars.items()]
    tensors.append(numpy_helper.from_array(np.array(_NORM_EPS, dtype=np.float32), "eps"))
    tensors.append(numpy_helper.from_array(model.bias.reshape(1, -1).astype(np.float32), "bias"))
    tensors.append(numpy_helper.from_array(np.ascontiguousarray(model.table, dtype=np.float32), "table"))
    return tensors


def write_model_folder(
    out: Path,
    trained: TrainedModel,
    *,
    name: str = "shunt-sentiment",
    extra_config: Mapping[str, Any] | None = None,
) -> str:
    """Write model.onnx, tokenizer.json, config.json and calibration.json into ``out``; return the version.

    Each file is replaced atomically, config.json last: it carries the version, so a watcher that keys
    on it never sees a new version beside old weights. Other files in ``out`` (card, metrics) are kept.
    """
    out.mkdir(parents=True, exist_ok=True)
    onnx_bytes = build_graph(trained.model, len(trained.labels)).SerializeToString()
    tokenizer_bytes = trained.tokenizer.to_str(pretty=True).encode()
    calibration = {"temperature": trained.temperature, "method": "temperature scaling, out-of-fold NLL"}
    calibration_bytes = orjson.dumps(calibration, option=orjson.OPT_INDENT_2)
    digest = hashlib.sha256(onnx_bytes + tokenizer_bytes + calibration_bytes).hexdigest()[:12]
    version = f"{name}-{digest}"
    config = _config_json(trained, version) | dict(extra_config or {})
    for filename, payload in (
        ("model.onnx", onnx_bytes),
        ("tokenizer.json", tokenizer_bytes),
        ("calibration.json", calibration_bytes),
        ("config.json", orjson.dumps(config, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)),
    ):
        _write_atomic(out / filename, payload)
    log.info("training.model_written", path=str(out), version=version, bytes=len(onnx_bytes))
    return version


def _config_json(trained: TrainedModel, version: str) -> dict[str, Any]:
    spec = trained.model.spec
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["HashedNgramLinearClassifier"],
        "id2label": {str(i): label for i, label in enumerate(trained.labels)},
        "label2id": {label: i for i, label in enumerate(trained.labels)},
        "num_labels": len(trained.labels),
        "shunt_version": version,
        "max_tokens": spec.max_tokens,
        "features": {
            "vocab_size": spec.vocab_size,
            "buckets": spec.buckets,
            "multiplier": spec.multiplier,
            "nb_power": trained.config.nb_power,
            "c": trained.cv.c,
        },
    }


def _write_atomic(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model folder is meant to be read by the service user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
