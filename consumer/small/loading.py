"""Loading and checking a model folder in the HF/optimum ONNX layout: every problem is a ModelLoadError naming it."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
from tokenizers import Tokenizer

from consumer.errors import ModelLoadError

REQUIRED_FILES = ("model.onnx", "tokenizer.json", "config.json")
FEEDABLE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_INT_TYPES: dict[str, type[np.signedinteger[Any]]] = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
_PAD_TOKENS = ("[PAD]", "<pad>", "<PAD>")


@dataclass(frozen=True, slots=True)
class GraphInputs:
    """Which of the three feedable inputs the graph declares, and their integer types."""

    dtypes: dict[str, type[np.signedinteger[Any]]]
    output: str


def check_files(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist or is not a folder")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ModelLoadError(f"model folder {path} is missing {', '.join(missing)} (needs {', '.join(REQUIRED_FILES)})")


def read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = orjson.loads((path / name).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ModelLoadError(f"model folder {path}: cannot read {name}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"model folder {path}: {name} must hold a JSON object")
    return data


def read_labels(path: Path, config: dict[str, Any]) -> tuple[str, ...]:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or len(id2label) < 2:
        raise ModelLoadError(f"model folder {path}: config.json needs an id2label object with at least 2 labels")
    try:
        by_index = {int(key): str(value) for key, value in id2label.items()}
    except ValueError:
        raise ModelLoadError(f"model folder {path}: config.json id2label keys must be integers") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ModelLoadError(f"model folder {path}: config.json id2label keys must be 0..{len(by_index) - 1}")
    labels = tuple(by_index[i] for i in range(len(by_index)))
    if len(set(labels)) != len(labels):
        raise ModelLoadError(f"model folder {path}: config.json id2label repeats a label: {list(labels)}")
    return labels


def load_tokenizer(path: Path) -> tuple[Tokenizer, int]:
    """The tokenizer, with its own padding turned off (we pad to each batch's longest), and its pad id."""
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(f"model folder {path}: unreadable tokenizer.json: {exc}") from None
    pad_id = _pad_id(tokenizer)
    tokenizer.no_padding()
    return tokenizer, pad_id


def open_session(path: Path, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning intra-op threads steal the cores the tokenizer needs between runs (measured: ~10% end to end).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelLoadError(f"model folder {path}: model.onnx is not a loadable ONNX graph: {exc}") from None


def read_graph_inputs(path: Path, session: ort.InferenceSession) -> GraphInputs:
    declared = {node.name: node.type for node in session.get_inputs()}
    unexpected = sorted(set(declared) - set(FEEDABLE_INPUTS))
    if unexpected or "input_ids" not in declared:
        raise ModelLoadError(
            f"model folder {path}: the graph declares inputs {sorted(declared)}; this scorer can feed only "
            f"{list(FEEDABLE_INPUTS)} and needs input_ids (cannot feed: {unexpected or ['-']})"
        )
    bad_types = {name: kind for name, kind in declared.items() if kind not in _INT_TYPES}
    if bad_types:
        raise ModelLoadError(f"model folder {path}: graph inputs must be int64 or int32, got {bad_types}")
    outputs = [node.name for node in session.get_outputs()]
    output = "logits" if "logits" in outputs else outputs[0]
    if len(outputs) > 1 and "logits" not in outputs:
        raise ModelLoadError(f"model folder {path}: the graph has outputs {outputs} and none is named 'logits'")
    return GraphInputs({name: _INT_TYPES[declared[name]] for name in FEEDABLE_INPUTS if name in declared}, output)


def token_limit(max_tokens: int, config: dict[str, Any]) -> int:
    """The caller's limit, but never past the model's position embeddings (a transformer would fail)."""
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        return min(max_tokens, positions)
    return max_tokens


def read_temperature(path: Path) -> float:
    if not (path / "calibration.json").is_file():
        return 1.0
    value = read_json(path, "calibration.json").get("temperature")
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ModelLoadError(f"model folder {path}: calibration.json temperature must be a positive number")
    return float(value)


def model_version(path: Path, config: dict[str, Any]) -> str:
    version = config.get("shunt_version")
    if isinstance(version, str) and version:
        return version
    digest = hashlib.sha256()
    with (path / "model.onnx").open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"onnx-{digest.hexdigest()[:12]}"


def _pad_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's pad id (masked out anyway; transformers still expect the real one)."""
    padding = tokenizer.padding
    if padding is not None and isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    for token in _PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0


def stamp(path: Path) -> tuple[int, int]:
    """model.onnx's (mtime in ns, size): a replica opens the graph again only while this is unchanged."""
    try:
        info = (path / "model.onnx").stat()
    except OSError:
        return (-1, -1)
    return (info.st_mtime_ns, info.st_size)
