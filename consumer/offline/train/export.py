"""Export a trained model as the service's model folder: the ONNX graph that computes the features from
``input_ids`` (it must agree with :func:`.features.count_matrix`), the tokenizer, config and calibration."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import structlog
from onnx import TensorProto, helper, numpy_helper

from consumer.offline.train.features import MODEL_TYPE, NORM_EPS, FeatureSpec
from consumer.offline.train.fit import LinearModel, TrainedModel

log = structlog.get_logger(__name__)

OPSET = 17  # with IR version 8: any onnxruntime >= 1.12 runs the graph; axes are inputs from opset 13


def build_graph(model: LinearModel, num_labels: int) -> onnx.ModelProto:
    """The ONNX graph: (input_ids, attention_mask) -> logits [batch, num_labels]."""
    graph = helper.make_graph(
        [*_feature_nodes(model.spec), *_pooling_nodes()],
        MODEL_TYPE,
        [_int_input("input_ids"), _int_input("attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels])],
        initializer=_initializers(model, num_labels),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="data-shunt")
    proto.ir_version = 8  # onnx's newest IR would needlessly lock out older runtimes
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _feature_nodes(spec: FeatureSpec) -> list[onnx.NodeProto]:
    """feature_ids = [unigrams, vocab + (ids[:, :-1] * multiplier + ids[:, 1:]) mod buckets], and their mask.

    Unigrams are the ids, or ``negated_offset + id`` inside a negation scope (:func:`.features.negation_scope`)."""
    unigrams = "input_ids"
    negation: list[onnx.NodeProto] = []
    if spec.negation_window:
        negation, unigrams = _negation_nodes(spec.negation_window), "unigram_ids"
    return [
        *negation,
        *_slice_pair("input_ids", "ids_a", "ids_b"),
        *_slice_pair("attention_mask", "mask_a", "mask_b"),
        helper.make_node("Mul", ["ids_a", "multiplier"], ["ids_am"]),
        helper.make_node("Add", ["ids_am", "ids_b"], ["pair"]),
        helper.make_node("Mod", ["pair", "buckets"], ["bucket"]),
        helper.make_node("Add", ["bucket", "vocab"], ["bigram_ids"]),
        helper.make_node("Mul", ["mask_a", "mask_b"], ["bigram_mask"]),
        helper.make_node("Concat", [unigrams, "bigram_ids"], ["feature_ids"], axis=1),
        helper.make_node("Concat", ["attention_mask", "bigram_mask"], ["feature_mask_i"], axis=1),
        helper.make_node("Cast", ["feature_mask_i"], ["feature_mask"], to=TensorProto.FLOAT),
    ]


def _negation_nodes(window: int) -> list[onnx.NodeProto]:
    """unigram_ids = ids + negated_offset * scope, the scope from one 1-D convolution.

    Channels of ``negation_codes[id]``: (is a negator, is punctuation). Output channel d - 1 (d = 1..window)
    at position i is ``negator[i - d] - 8 * (punct[i - d + 1] + ... + punct[i])``: above 0.5 exactly when
    token i - d is a negator and no punctuation lies in (i - d, i], as in :func:`.features.negation_scope`.
    The left padding of ``window`` zeros makes positions before the start count as neither."""
    return [
        helper.make_node("Gather", ["negation_codes", "input_ids"], ["codes"], axis=0),  # [b, n, 2]
        helper.make_node("Transpose", ["codes"], ["codes_t"], perm=[0, 2, 1]),  # [b, 2, n]
        helper.make_node("Conv", ["codes_t", "negation_kernel"], ["windows"], pads=[window, 0]),  # [b, w, n]
        helper.make_node("ReduceMax", ["windows"], ["best"], axes=[1], keepdims=0),
        helper.make_node("Greater", ["best", "half"], ["in_scope"]),
        helper.make_node("Cast", ["in_scope"], ["scope"], to=TensorProto.INT64),
        helper.make_node("Mul", ["scope", "negated_offset"], ["negation_shift"]),
        helper.make_node("Add", ["input_ids", "negation_shift"], ["unigram_ids"]),
    ]


def _negation_tensors(spec: FeatureSpec) -> list[onnx.TensorProto]:
    """The per-token codes and the convolution kernel of :func:`_negation_nodes`."""
    window = spec.negation_window
    codes = np.zeros((spec.vocab_size, 2), dtype=np.float32)
    codes[list(spec.negators), 0] = 1.0
    codes[list(spec.punctuation), 1] = 1.0
    kernel = np.zeros((window, 2, window + 1), dtype=np.float32)  # [out d - 1, in, tap k]; tap k reads i - window + k
    for d in range(1, window + 1):
        kernel[d - 1, 0, window - d] = 1.0
        kernel[d - 1, 1, window - d + 1 :] = -8.0
    return [
        numpy_helper.from_array(codes, "negation_codes"),
        numpy_helper.from_array(kernel, "negation_kernel"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        numpy_helper.from_array(np.array(spec.negated_offset, dtype=np.int64), "negated_offset"),
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
    if spec.negation_window:
        tensors += _negation_tensors(spec)
    tensors.append(numpy_helper.from_array(np.array(NORM_EPS, dtype=np.float32), "eps"))
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
            "negation_window": spec.negation_window,
            "nb_power": trained.config.nb_power,
            "c": trained.cv.c,
            "final_model": trained.config.final_model,
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
