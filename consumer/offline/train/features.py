"""The default small model's features and tokenizer: a linear classifier over subword unigrams and
hashed subword bigrams, computed inside the ONNX graph from ``input_ids``.

Why this shape: the small model sees every review, so it must cost far less than tokenisation. The graph
is a gather from one weight table, a masked sum and one division; all the learning happens offline (:mod:`.fit`):

* features: every token id ``t`` (a unigram) and, for each adjacent pair ``(a, b)``, the hashed bigram
  ``V + (a * M + b) mod H`` (V = vocabulary size, H = buckets, M = an odd multiplier); with negation
  marking, a unigram within ``negation_window`` tokens after a negator (no punctuation in between)
  becomes its negated copy ``V + H + t``;
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
    negation_window: int = 0
    negators: tuple[int, ...] = ()
    punctuation: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        """Unigrams, hashed bigrams and, with negation marking, the negated unigrams."""
        return self.vocab_size + self.buckets + (self.vocab_size if self.negation_window else 0)

    @property
    def negated_offset(self) -> int:
        """Where the negated copy of unigram ``t`` lives: ``negated_offset + t``."""
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


NEGATORS = ("not", "no", "never", "t", "nothing", "nor", "none", "neither", "without", "cannot", "nobody", "hardly")


def feature_spec(
    tokenizer: Tokenizer, buckets: int = 2**18, max_tokens: int = 256, negation_window: int = 0
) -> FeatureSpec:
    """The feature layout for ``tokenizer``: negation words and punctuation are looked up in its vocabulary.

    ``t`` is a negator because the Whitespace pre-tokenizer splits "don't" into "don", "'", "t".
    Punctuation is any token without a letter or digit, except the apostrophe (it sits inside "n't")."""
    vocab = tokenizer.get_vocab()
    negators = tuple(sorted(vocab[word] for word in NEGATORS if word in vocab))
    punctuation = tuple(
        sorted(i for word, i in vocab.items() if word not in (PAD, UNK, "'") and not any(ch.isalnum() for ch in word))
    )
    return FeatureSpec(
        tokenizer.get_vocab_size(),
        buckets,
        max_tokens=max_tokens,
        negation_window=negation_window,
        negators=negators if negation_window else (),
        punctuation=punctuation if negation_window else (),
    )


def negation_scope(tokens: Ids, spec: FeatureSpec) -> npt.NDArray[np.bool_]:
    """True where one of the previous ``negation_window`` tokens is a negator and no punctuation lies in
    between (nor on the token itself): "not very good" marks "very" and "good", "not bad. great" not "great"."""
    n = len(tokens)
    scope = np.zeros(n, dtype=bool)
    if not spec.negation_window or n == 0:
        return scope
    is_neg = np.isin(tokens, spec.negators)
    not_punct = ~np.isin(tokens, spec.punctuation)
    clear = not_punct.copy()  # clear[i]: no punctuation in (i - d, i], built up over d
    for d in range(1, spec.negation_window + 1):
        if d > 1:
            clear = clear & _shift(not_punct, d - 1, True)
        scope |= _shift(is_neg, d, False) & clear
    return scope


def _shift(values: npt.NDArray[np.bool_], d: int, fill: bool) -> npt.NDArray[np.bool_]:
    """``values`` moved ``d`` positions right (``out[i] = values[i - d]``), ``fill`` at the start."""
    out = np.full(len(values), fill, dtype=bool)
    if d < len(values):
        out[d:] = values[: len(values) - d]
    return out


def feature_ids(ids: Sequence[int], spec: FeatureSpec) -> Ids:
    """Unigram ids (negated copies inside a negation scope) followed by hashed bigram ids, as the graph."""
    tokens = np.asarray(ids, dtype=np.int64)
    unigrams = np.where(negation_scope(tokens, spec), spec.negated_offset + tokens, tokens)
    bigrams = spec.vocab_size + (tokens[:-1] * spec.multiplier + tokens[1:]) % spec.buckets
    out: Ids = np.concatenate([unigrams, bigrams])
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
