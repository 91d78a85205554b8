"""Fit the linear model: NB-scaled features, a soft-target logistic regression, C chosen by k-fold
cross-validation and the temperature fitted on the out-of-fold logits (see :mod:`.features`).

The shipped model is the average of that C's k fold models (``final_model = "fold_average"``): the
temperature was fitted on exactly those models' out-of-fold logits, and a linear model's average is still
one table (same graph, same speed). A nested cross-validation chose it over a refit on all data
(``"refit"``) and over a temperature from a held-out slice; see the model card."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import structlog
from scipy import sparse  # type: ignore[import-untyped, unused-ignore]
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from tokenizers import Tokenizer

from consumer.offline.train.features import (
    NORM_EPS,
    FeatureSpec,
    Floats,
    Ints,
    Progress,
    count_matrix,
    feature_spec,
    train_tokenizer,
)
from consumer.small.calibration import fit_temperature, nll

log = structlog.get_logger(__name__)

LogitsFn = Callable[[Ints, Ints, float], Floats]
FinalModel = Literal["fold_average", "refit"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters; the defaults were chosen by 5-fold cross-validation on the training split only."""

    vocab_size: int = 20_000
    min_frequency: int = 2
    buckets: int = 2**18
    max_tokens: int = 384
    negation_window: int = 3
    c_grid: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0)
    folds: int = 5
    nb_power: float = 0.5
    nb_alpha: float = 1.0
    seed: int = 0
    max_iter: int = 5_000
    final_model: FinalModel = "fold_average"
    # How C is chosen from the out-of-fold logits: the highest accuracy, or the lowest log-loss after the
    # temperature (calibrated probabilities, what the router reads; `shunt distill` uses it, docs/l4s.md).
    select_c_by: Literal["accuracy", "nll"] = "accuracy"


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
        out: Floats = num / np.sqrt(den + NORM_EPS) + self.bias
        return out


@dataclass(frozen=True, slots=True)
class CrossValidation:
    """What k-fold cross-validation chose, with the out-of-fold logits used for the temperature."""

    c: float
    accuracy: dict[float, float]
    oof_logits: Floats
    nll: dict[float, float] = field(default_factory=dict)  # after each C's own temperature


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """Everything :func:`write_model_folder` needs, plus the cross-validation record."""

    labels: tuple[str, ...]
    tokenizer: Tokenizer
    model: LinearModel
    temperature: float
    cv: CrossValidation
    config: TrainConfig = field(default_factory=TrainConfig)


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
    norms = np.sqrt(np.asarray(counts @ (scale**2)).ravel() + NORM_EPS)
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


def fit_linear(
    counts: Any, targets: Floats, weights: Floats, c: float, config: TrainConfig, *, spec: FeatureSpec
) -> LinearModel:
    """Fit scale and weights on ``counts`` (laid out by ``spec``) and fold them into one table."""
    scale = feature_scale(counts, targets, weights, config.nb_power, config.nb_alpha)
    coef, bias = fit_logistic(normalise(counts, scale), targets, weights, c, config.max_iter)
    table = np.hstack([coef * scale[:, None], (scale**2)[:, None]]).astype(np.float32)
    return LinearModel(spec=spec, table=table, bias=bias.astype(np.float32))


def average_models(models: Sequence[LinearModel]) -> LinearModel:
    """The mean of models over one feature space: the mean table and bias (the folded scale included)."""
    if not models:
        raise ValueError("no models to average")
    table = np.mean([m.table.astype(np.float64) for m in models], axis=0).astype(np.float32)
    bias = np.mean([m.bias.astype(np.float64) for m in models], axis=0).astype(np.float32)
    return LinearModel(spec=models[0].spec, table=table, bias=bias)


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
    """Pick C by k-fold accuracy or calibrated log-loss (``select_c_by``); keep that C's out-of-fold logits
    for the temperature."""
    if not config.c_grid:
        raise ValueError("TrainConfig.c_grid is empty")
    folds = fold_ids(targets, config.folds, config.seed)
    hard = targets.argmax(axis=1)
    accuracy: dict[float, float] = {}
    losses: dict[float, float] = {}
    logits: dict[float, Floats] = {}
    for c in config.c_grid:
        oof = np.zeros_like(targets)
        for k in range(config.folds):
            fit_idx, eval_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            oof[eval_idx] = logits_fn(fit_idx, eval_idx, c)
        accuracy[c] = float((oof.argmax(axis=1) == hard).mean())
        losses[c] = nll(oof, targets, fit_temperature(oof, targets))
        logits[c] = oof
        progress(f"C={c:g}: {config.folds}-fold accuracy {accuracy[c]:.4f}, calibrated log-loss {losses[c]:.4f}")
    if config.select_c_by == "nll":
        best = min(config.c_grid, key=lambda c: losses[c])  # ties go to the first, the most regularised
    else:
        best = max(config.c_grid, key=lambda c: accuracy[c])
    return CrossValidation(c=best, accuracy=accuracy, oof_logits=logits[best], nll=losses)


@dataclass(frozen=True, slots=True)
class ExtraData:
    """Labelled texts added to the fitting side of every fold and of the final fit, never evaluated on:
    e.g. the UCI sentences beside the Amazon reviews. ``weight`` is each text's sample weight."""

    texts: Sequence[str]
    targets: Floats
    weight: float = 1.0


def train(
    texts: Sequence[str],
    targets: Floats,
    labels: Sequence[str],
    *,
    sample_weight: Floats | None = None,
    config: TrainConfig | None = None,
    tokenizer: Tokenizer | None = None,
    progress: Progress | None = None,
    extra: ExtraData | None = None,
) -> TrainedModel:
    """Train tokenizer (unless given), choose C by k-fold, fit on everything, calibrate on out-of-fold logits.

    ``targets`` is n x C probabilities (use :func:`one_hot` for hard labels), columns in ``labels`` order;
    ``extra`` data join every fit (not the tokenizer, not the folds' evaluation, not the temperature)."""
    config = config or TrainConfig()
    say = progress or (lambda _message: None)
    targets = _check_targets(targets, len(texts), len(labels))
    weights = np.ones(len(texts)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if tokenizer is None:
        say(f"training a BPE tokenizer (vocab {config.vocab_size}) on {len(texts)} texts")
        tokenizer = train_tokenizer(texts, config.vocab_size, config.min_frequency)
    spec = feature_spec(tokenizer, config.buckets, config.max_tokens, config.negation_window)
    counts = count_matrix(tokenizer, texts, spec)
    fitter = _Fitter(counts, targets, weights, _extra_parts(extra, tokenizer, spec, len(labels), say), config, spec)
    cv = cross_validate(fitter.fold_logits, targets, config, say)
    temperature = fit_temperature(cv.oof_logits, targets)
    say(f"chose C={cv.c:g}; temperature {temperature:.3f} from out-of-fold logits; final model: {config.final_model}")
    if config.final_model == "refit":
        model = fitter.fit(np.arange(len(texts)), cv.c)
    else:
        model = average_models(fitter.fold_models[cv.c])
    log.info("training.done", samples=len(texts), labels=list(labels), c=cv.c, temperature=temperature)
    return TrainedModel(tuple(labels), tokenizer, model, temperature, cv, config)


@dataclass
class _Fitter:
    """Fits on a subset of the rows plus every extra row; keeps each C's fold models for the average."""

    counts: Any
    targets: Floats
    weights: Floats
    extra: tuple[Any, Floats, Floats]  # counts, targets, weights
    config: TrainConfig
    spec: FeatureSpec
    fold_models: dict[float, list[LinearModel]] = field(default_factory=dict)

    def fit(self, idx: Ints, c: float) -> LinearModel:
        counts, targets, weights = self.extra
        x = sparse.vstack([self.counts[idx], counts]).tocsr()
        y = np.vstack([self.targets[idx], targets])
        return fit_linear(x, y, np.concatenate([self.weights[idx], weights]), c, self.config, spec=self.spec)

    def fold_logits(self, fit_idx: Ints, eval_idx: Ints, c: float) -> Floats:
        self.fold_models.setdefault(c, []).append(self.fit(fit_idx, c))
        return self.fold_models[c][-1].logits(self.counts[eval_idx])


def _extra_parts(
    extra: ExtraData | None, tokenizer: Tokenizer, spec: FeatureSpec, n_labels: int, say: Progress
) -> tuple[Any, Floats, Floats]:
    """Counts, targets and weights of the extra data (empty without any)."""
    if extra is None or not len(extra.texts):
        return sparse.csr_matrix((0, spec.width)), np.zeros((0, n_labels)), np.zeros(0)
    targets = _check_targets(extra.targets, len(extra.texts), n_labels)
    say(f"adding {len(extra.texts)} extra texts (weight {extra.weight:g}) to every fit")
    return count_matrix(tokenizer, extra.texts, spec), targets, np.full(len(extra.texts), extra.weight)


def _check_targets(targets: Floats, n: int, n_labels: int) -> Floats:
    targets = np.asarray(targets, dtype=np.float64)
    if targets.shape != (n, n_labels):
        raise ValueError(f"targets must be {n} x {n_labels} (texts x labels), got {targets.shape}")
    if n_labels < 2 or np.any(targets < 0) or not np.allclose(targets.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("targets must be probabilities over at least two labels (rows summing to 1)")
    return targets
