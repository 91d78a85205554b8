# ruff: noqa  (scratch: the experiments behind the model card, kept as run)
"""Calibration for routing, on out-of-fold logits inside the training split only.

For each method: AURC (area under the risk-coverage curve, lower is better), selective accuracy at 60/70/80%
coverage, and ECE. Every calibrator is cross-fitted over the same 5 folds (fit on 4 folds' OOF logits,
applied to the 5th), so no review's calibrated score saw its own label.
"""

import sys

import numpy as np
import orjson
from sklearn.isotonic import IsotonicRegression

from ops.modelcard.cv_options import CACHE, SEED, load

from consumer.offline import train as training
from consumer.small.calibration import fit_temperature, softmax

key = sys.argv[1]
index = [orjson.loads(line) for line in (CACHE / "oof" / "index.jsonl").read_bytes().splitlines()]
entry = [e for e in index if e["key"] == orjson.dumps(orjson.loads(key), option=orjson.OPT_SORT_KEYS).decode()][-1]
oof = np.load(CACHE / "oof" / f"{entry['file']}.npy")
data = load()
y = data["y"]
truth = y.argmax(1)
dom = np.asarray(data["domain"])
folds = training.fold_ids(y, 5, SEED + 1)  # calibration folds, not the same hash as the model's folds


def aurc(conf, correct):
    order = np.argsort(-conf, kind="stable")
    c = correct[order]
    risk = 1 - np.cumsum(c) / np.arange(1, len(c) + 1)
    return float(risk.mean())


def sel_acc(conf, correct, cov):
    order = np.argsort(-conf, kind="stable")
    k = int(round(len(conf) * cov))
    return float(correct[order[:k]].mean())


pred = oof.argmax(1)
correct = pred == truth
margin = oof[:, 1] - oof[:, 0]
methods = {}
methods["raw (T=1)"] = softmax(oof)
p = np.zeros_like(oof)
for k in range(5):
    fi, ei = folds != k, folds == k
    T = fit_temperature(oof[fi], y[fi])
    p[ei] = softmax(oof[ei], T)
methods["temperature"] = p
p = np.zeros_like(oof)
for k in range(5):
    for d in np.unique(dom):
        fi, ei = (folds != k) & (dom == d), (folds == k) & (dom == d)
        T = fit_temperature(oof[fi], y[fi])
        p[ei] = softmax(oof[ei], T)
methods["per-domain temperature"] = p
p = np.zeros_like(oof)
for k in range(5):
    fi, ei = folds != k, folds == k
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-4, y_max=1 - 1e-4).fit(margin[fi], truth[fi])
    p1 = iso.predict(margin[ei])
    p[ei] = np.stack([1 - p1, p1], axis=1)
methods["isotonic (margin)"] = p
for name, probs in methods.items():
    conf = probs.max(1)
    ok = probs.argmax(1) == truth
    print(
        f"{name:24s} acc {ok.mean():.4f}  AURC {aurc(conf, ok):.4f}  sel@60 {sel_acc(conf, ok, 0.6):.4f}  "
        f"sel@70 {sel_acc(conf, ok, 0.7):.4f}  sel@80 {sel_acc(conf, ok, 0.8):.4f}  ECE {training.expected_calibration_error(probs, truth):.4f}"
    )
