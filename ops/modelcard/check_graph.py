# ruff: noqa  (scratch: the experiments behind the model card, kept as run)
"""Check: ONNX logits of a small model trained with negation marking equal the numpy mirror."""

import tempfile
from pathlib import Path

import numpy as np

from consumer.offline import datasets
from consumer.offline import train as training
from consumer.small.calibration import fit_temperature, softmax
from consumer.small.scoring import OnnxScorer

rows = datasets.load_amazon()[:600]
texts = [r["text"] for r in rows]
labels = ("negative", "positive")
cfg = training.TrainConfig(vocab_size=3000, c_grid=(100.0,), folds=3, max_tokens=512)
extra = [r for r in datasets.load_uci()][:300]
tm = training.train(
    texts,
    training.one_hot([r["label"] for r in rows], labels),
    labels,
    config=cfg,
    extra=training.ExtraData([r["text"] for r in extra], training.one_hot([r["label"] for r in extra], labels), 0.5),
)
probe = texts[:200] + ["not good", "no", "not", "this is not. good", "", "didn't like it at all, but great"]
with tempfile.TemporaryDirectory() as d:
    training.write_model_folder(Path(d), tm)
    sc = OnnxScorer.load(Path(d), max_tokens=512)
    onnx_logits = np.concatenate([sc.logits(sc.encode(probe[i : i + 32])) for i in range(0, len(probe), 32)])
ref = tm.model.logits(training.count_matrix(tm.tokenizer, probe, tm.model.spec))
print(
    "max abs diff",
    np.abs(onnx_logits - ref).max(),
    "spec",
    tm.model.spec.negation_window,
    len(tm.model.spec.negators),
    len(tm.model.spec.punctuation),
)
ids = training.encode_ids(tm.tokenizer, ["didn't like it at all, but great"], 512)[0]
print(
    [tm.tokenizer.id_to_token(i) for i in ids],
    training.negation_scope(np.array(ids), tm.model.spec).astype(int).tolist(),
)
