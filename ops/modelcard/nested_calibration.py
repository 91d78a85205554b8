# ruff: noqa  (scratch: the experiments behind the model card, kept as run)
"""Nested CV of the calibration procedure, inside the training split only (never the 1,120 test rows).

Outer 5 folds (their own hash seed); inside each outer-training part, the inner 5 folds of the shipped
procedure (fold_ids with the training seed) give out-of-fold logits and the temperature T. Compared on the
outer fold: (a) one model on all inner data + T from inner OOF (today), (b) the average of the 5 inner fold
models' tables and biases + the same T, (c) inner fold model 0 with T refit on its own held-out slice
(inner fold 0). C is the shipped C=300; UCI sentences join every fit with weight 0.5.

    nice -n 10 .venv/bin/python -m ops.modelcard.nested_calibration [C [OUTER_SEED_OFFSET]]   # 300, 2 (also run: 3, 4)

It also prints the ECE "noise floor": the ECE a perfectly calibrated model shows on n reviews when each
label is drawn from (a)'s own probabilities (15 bins, as everywhere here).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from scipy import sparse

from consumer.offline import datasets
from consumer.offline import train as training
from consumer.small.calibration import ece_of, fit_temperature, softmax

SEED = datasets.DEFAULT_SPLIT_SEED
C = float(sys.argv[1]) if len(sys.argv) > 1 else 300.0
OUTER_SEED = SEED + (int(sys.argv[2]) if len(sys.argv) > 2 else 2)
LABELS = ("negative", "positive")


def aurc(probs, truth):
    order = np.argsort(-probs.max(axis=1), kind="stable")
    ok = (probs.argmax(axis=1) == truth)[order]
    return float((1.0 - np.cumsum(ok) / np.arange(1, len(ok) + 1)).mean())


def main() -> None:
    rows = datasets.load_amazon()
    train_rows, _test_rows_never_used = datasets.split_amazon(rows, seed=SEED)
    del _test_rows_never_used
    texts = [str(r["text"]) for r in train_rows]
    y = training.one_hot([str(r["label"]) for r in train_rows], LABELS)
    uci = datasets.load_uci()
    uy = training.one_hot([str(r["label"]) for r in uci], LABELS)
    config = training.TrainConfig(seed=SEED)
    tok = training.train_tokenizer(texts, config.vocab_size, config.min_frequency)
    spec = training.feature_spec(tok, config.buckets, config.max_tokens, config.negation_window)
    X = training.count_matrix(tok, texts, spec)
    U = training.count_matrix(tok, [str(r["text"]) for r in uci], spec)
    uw = np.full(len(uci), 0.5)

    def fit(idx):
        x = sparse.vstack([X[idx], U]).tocsr()
        return training.fit_linear(
            x, np.vstack([y[idx], uy]), np.concatenate([np.ones(len(idx)), uw]), C, config, spec=spec
        )

    truth = y.argmax(axis=1)
    outer = training.fold_ids(y, 5, OUTER_SEED)
    pooled = {m: np.zeros_like(y) for m in "abc"}
    temps = {m: [] for m in "abc"}
    per_fold = {m: [] for m in "abc"}
    for k in range(5):
        started = time.perf_counter()
        inner_idx, test_idx = np.flatnonzero(outer != k), np.flatnonzero(outer == k)
        inner_folds = training.fold_ids(y[inner_idx], 5, SEED)
        oof = np.zeros((len(inner_idx), 2))
        models = []
        for j in range(5):
            fi, ei = inner_idx[inner_folds != j], inner_idx[inner_folds == j]
            model = fit(fi)
            models.append(model)
            oof[inner_folds == j] = model.logits(X[ei])
        t_oof = fit_temperature(oof, y[inner_idx])
        full = fit(inner_idx)
        avg = training.LinearModel(
            spec=spec,
            table=np.mean([m.table for m in models], axis=0).astype(np.float32),
            bias=np.mean([m.bias for m in models], axis=0).astype(np.float32),
        )
        slice0 = inner_folds == 0
        t_slice = fit_temperature(oof[slice0], y[inner_idx][slice0])
        variants = {"a": (full, t_oof), "b": (avg, t_oof), "c": (models[0], t_slice)}
        for m, (model, t) in variants.items():
            probs = softmax(model.logits(X[test_idx]), t)
            pooled[m][test_idx] = probs
            temps[m].append(t)
            tt = truth[test_idx]
            per_fold[m].append((float((probs.argmax(1) == tt).mean()), ece_of(probs, tt), aurc(probs, tt)))
        raw_full = full.logits(X[test_idx])
        print(
            f"outer {k}: T_oof {t_oof:.3f}, T_slice {t_slice:.3f}, "
            f"best T on outer fold for (a) {fit_temperature(raw_full, y[test_idx]):.3f}, "
            f"for (b) {fit_temperature(avg.logits(X[test_idx]), y[test_idx]):.3f} (diagnostic only), "
            f"mean |logit| oof {np.abs(oof).mean():.2f} full {np.abs(raw_full).mean():.2f} "
            f"avg {np.abs(avg.logits(X[test_idx])).mean():.2f}; {time.perf_counter() - started:.0f}s",
            flush=True,
        )
        for m in "abc":
            a, e, r = per_fold[m][-1]
            print(f"   ({m}) acc {a:.4f} ECE {e:.4f} AURC {r:.4f} T {temps[m][-1]:.3f}", flush=True)
    rng = np.random.default_rng(0)
    for n in (896, 1120):
        floor = []
        for _ in range(300):  # labels drawn from (a)'s own probabilities: the ECE of a perfectly calibrated model
            pick = rng.choice(len(truth), size=n, replace=False)
            probs = pooled["a"][pick]
            drawn = (rng.random(n) < probs[:, 1]).astype(np.intp)
            floor.append(ece_of(probs, drawn))
        print(f"ECE noise floor at n={n}: mean {np.mean(floor):.4f}, 90th pct {np.quantile(floor, 0.9):.4f}")
    for m in "bc":
        diff = np.asarray(per_fold[m])[:, 1] - np.asarray(per_fold["a"])[:, 1]
        print(f"per-fold ECE ({m}) - (a): {np.round(diff, 4).tolist()}")
    print("pooled over the 5 outer folds (4,480 reviews, each scored by a model that never saw it):")
    for m in "abc":
        probs = pooled[m]
        f = np.asarray(per_fold[m])
        print(
            f"  ({m}) accuracy {(probs.argmax(1) == truth).mean():.4f}  ECE {ece_of(probs, truth):.4f}  "
            f"AURC {aurc(probs, truth):.4f}  | per fold: ECE mean {f[:, 1].mean():.4f} sd {f[:, 1].std(ddof=1):.4f}"
            f" max {f[:, 1].max():.4f}; acc mean {f[:, 0].mean():.4f}; T {np.round(temps[m], 3).tolist()}"
        )


if __name__ == "__main__":
    main()
