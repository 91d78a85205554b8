# ruff: noqa  (scratch: the experiments behind the model card, kept as run)
"""5-fold CV of feature/model options inside the training split only (never the 1,120 test rows).

    nice -n 10 .venv/bin/python -m ops.modelcard.cv_options OPTION [OPTION ...]

Token ids are cached in /tmp/s17cache (outside the repository: they are derived from review text).
"""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from scipy import sparse

from consumer.offline import datasets
from consumer.offline import train as training
from consumer.small.calibration import fit_temperature, softmax

CACHE = Path("/tmp/s17cache")
SEED = datasets.DEFAULT_SPLIT_SEED
NEG_WORDS = {"not", "no", "never", "t", "nothing", "nor", "none", "neither", "without", "cannot", "nobody", "hardly"}


def load() -> dict[str, Any]:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / "ids.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    rows = datasets.load_amazon()
    train_rows, _test = datasets.split_amazon(rows, seed=SEED)
    labels = ("negative", "positive")
    texts = [str(r["text"]) for r in train_rows]
    tok = training.train_tokenizer(texts, 20_000, 2)
    ids = training.encode_ids(tok, texts, 4096)
    uci = [
        orjson.loads(line)
        for line in (datasets.data_dir() / "uci-sentences.jsonl").read_bytes().splitlines()
        if line.strip()
    ]
    uci_ids = training.encode_ids(tok, [str(r["text"]) for r in uci], 4096)
    out = {
        "ids": ids,
        "y": training.one_hot([str(r["label"]) for r in train_rows], labels),
        "domain": [str(r["domain"]) for r in train_rows],
        "rating": [r.get("rating") for r in train_rows],
        "uci_ids": uci_ids,
        "uci_y": training.one_hot([str(r["label"]) for r in uci], labels),
        "vocab": tok.get_vocab(),
        "V": tok.get_vocab_size(),
        "tok": tok.to_str(),
    }
    path.write_bytes(pickle.dumps(out))
    return out


def features(ids_list: list[list[int]], V: int, opts: dict[str, Any], vocab: dict[str, int]) -> Any:
    n_tok = opts.get("max_tokens", 256)
    H = opts.get("buckets", 2**18)
    H3 = opts.get("tri_buckets", H)
    tri = opts.get("tri", False)
    neg = opts.get("neg")  # None | window k (int) | "punct"
    neg_ids = np.zeros(V, dtype=bool)
    punct_ids = np.zeros(V, dtype=bool)
    for w, i in vocab.items():
        if w in NEG_WORDS:
            neg_ids[i] = True
        if w and all(not ch.isalnum() for ch in w) and w not in ("'",):
            punct_ids[i] = True
    width = V + H + (H3 if tri else 0) + (V if neg else 0)
    rows = []
    for ids in ids_list:
        t = np.asarray(ids[:n_tok], dtype=np.int64)
        parts = []
        uni = t.copy()
        if neg is not None and len(t):
            isneg = neg_ids[t]
            ispunct = punct_ids[t]
            scope = np.zeros(len(t), dtype=bool)
            if neg == "punct":
                on = False
                for i in range(len(t)):
                    if ispunct[i]:
                        on = False
                    elif on:
                        scope[i] = True
                    if isneg[i]:
                        on = True
            else:
                k = int(neg)
                block = opts.get("neg_block", True)
                for d in range(1, k + 1):
                    # token i is in scope if token i-d is a negation and no punctuation in (i-d, i]
                    ok = np.zeros(len(t), dtype=bool)
                    ok[d:] = isneg[:-d] if d < len(t) else False
                    if block:
                        for e in range(0, d):
                            p = np.zeros(len(t), dtype=bool)
                            p[e:] = ispunct[: len(t) - e] if e < len(t) else False
                            ok &= ~p
                    scope |= ok
            offset = V + H + (H3 if tri else 0)
            if opts.get("neg_mode", "replace") == "replace":
                uni = np.where(scope, offset + t, t)
                parts.append(uni)
            else:
                parts.append(t)
                parts.append((offset + t)[scope])
        else:
            parts.append(uni)
        if len(t) > 1:
            parts.append(V + (t[:-1] * 1_000_003 + t[1:]) % H)
        if tri and len(t) > 2:
            parts.append(V + H + ((t[:-2] * 1_000_003 + t[1:-1]) * 999_983 + t[2:]) % H3)
        rows.append(np.concatenate(parts))
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    indices = np.concatenate(rows)
    m = sparse.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(rows), width))
    m.sum_duplicates()
    return m


def fit(counts: Any, y: Any, w: Any, c: float, opts: dict[str, Any]) -> tuple[Any, Any, Any]:
    if opts.get("binary"):
        counts = counts.copy()
        counts.data[:] = 1.0
    scale = training.feature_scale(counts, y, w, opts.get("nb_power", 0.5), opts.get("nb_alpha", 1.0))
    coef, bias = training.fit_logistic(training.normalise(counts, scale), y, w, c, 5_000)
    return scale, coef, bias


def predict(counts: Any, model: tuple[Any, Any, Any], opts: dict[str, Any]) -> Any:
    if opts.get("binary"):
        counts = counts.copy()
        counts.data[:] = 1.0
    scale, coef, bias = model
    return np.asarray(training.normalise(counts, scale) @ coef) + bias


def cv(data: dict[str, Any], opts: dict[str, Any], c_grid: tuple[float, ...]) -> dict[str, Any]:
    V = data["V"]
    X = features(data["ids"], V, opts, data["vocab"])
    y = data["y"]
    n = len(y)
    w = np.ones(n)
    extra = opts.get("uci_weight", 0.0)
    if extra:
        Xu = features(data["uci_ids"], V, opts, data["vocab"])
        yu = data["uci_y"]
    folds = training.fold_ids(y, 5, SEED)
    hard = y.argmax(axis=1)
    views = opts.get("views")  # list of option dicts for extra views ensembled (logit average)
    out: dict[str, Any] = {"opts": opts, "acc": {}, "oof": {}}
    for c in c_grid:
        oof = np.zeros_like(y)
        for k in range(5):
            fi, ei = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            Xf, yf, wf = X[fi], y[fi], w[fi]
            if extra:
                Xf = sparse.vstack([Xf, Xu]).tocsr()
                yf = np.vstack([yf, yu])
                wf = np.concatenate([wf, np.full(len(yu), extra)])
            logits = predict(X[ei], fit(Xf, yf, wf, c, opts), opts)
            for v in views or []:
                vo = {**opts, **v}
                cv_c = v.get("c", c)
                logits = logits + v.get("weight", 1.0) * predict(X[ei], fit(Xf, yf, wf, cv_c, vo), vo)
            oof[ei] = logits
        acc = float((oof.argmax(1) == hard).mean())
        out["acc"][c] = acc
        out["oof"][c] = oof
    return out


if __name__ == "__main__":
    data = load()
    grid = tuple(float(x) for x in (sys.argv[2].split(",") if len(sys.argv) > 2 else "100,300,1000".split(",")))
    opts = orjson.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    t0 = time.time()
    res = cv(data, opts, grid)
    best = max(res["acc"], key=res["acc"].get)
    oof = res["oof"][best]
    T = fit_temperature(oof, data["y"])
    p = softmax(oof, T)
    ece = training.expected_calibration_error(p, data["y"].argmax(1))
    print(
        orjson.dumps(
            {
                "opts": opts,
                "acc": {f"{c:g}": round(a, 4) for c, a in res["acc"].items()},
                "best_c": best,
                "T": round(T, 3),
                "oof_ece": round(ece, 4),
                "sec": round(time.time() - t0, 1),
            }
        ).decode(),
        flush=True,
    )
    key = orjson.dumps(opts, option=orjson.OPT_SORT_KEYS).decode()
    (CACHE / "oof").mkdir(exist_ok=True)
    import hashlib

    np.save(CACHE / "oof" / (hashlib.md5(key.encode()).hexdigest()[:10] + ".npy"), oof)
    with open(CACHE / "oof" / "index.jsonl", "a") as fh:
        fh.write(
            orjson.dumps({"key": key, "file": hashlib.md5(key.encode()).hexdigest()[:10], "c": best}).decode() + "\n"
        )
