"""The default small model's features and tokenizer: a linear classifier over subword unigrams and
hashed subword bigrams, computed inside the ONNX graph from ``input_ids``.

Why this shape: the small model sees every review, so it must cost far less than tokenisation. The graph
is a gather from one weight table, a masked sum and one division; all the learning happens offline (:mod:`.fit`):

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse  # type: ignore[import-untyped, unused-ignore]
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

Floats = npt.NDArray[np.float64]
Ids = npt.NDArray[np.int64]
Ints = npt.NDArray[np.intp]
Progress = Callable[[str], None]

MODEL_TYPE = "shunt-hashed-ngram-linear"
PAD, UNK = "[PAD]", "[UNK]"
NORM_EPS = 1e-6


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
