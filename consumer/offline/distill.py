"""L4S: retrain the small model from the LLM's answers, gate it, and publish it for hot reload.

Every fresh LLM answer the service publishes to the distill topic (``distill.v1``) is a free label for a
review the small model was unsure of. Two-stage confidence distillation turns them into a new model:

* **stage 1** fits the LLM-labelled hard reviews alone. Its out-of-fold probabilities say, for each
  record, whether a model that never saw that record agrees with the LLM: the record's *confidence*.
* **stage 2** fits the mix: the original training data with the OLD model's probabilities as soft
  targets (so it does not forget), and the hard reviews with the LLM's labels smoothed by the LLM's
  accuracy, each weighted by its stage-1 confidence, their total weight capped so they never swamp.

The candidate is scored with the service's own scorer on the original held-out split (the gate: not
worse than the base model beyond a tolerance) and on a held-out share of the distill records that no
stage ever trains on. Only a candidate that passes becomes a new versioned folder; :func:`promote`
flips a symlink to it atomically. docs/l4s.md explains each choice and shows a full experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog
from tokenizers import Tokenizer

from consumer.errors import ShuntError
from consumer.kafka.reader import TopicReadError, read_topics
from consumer.llm.prompting import normalise_text
from consumer.offline import datasets
from consumer.offline import train as training
from consumer.small.calibration import fit_temperature, softmax
from consumer.small.scoring import OnnxScorer

log = structlog.get_logger(__name__)

Progress = Callable[[str], None]
Row = Mapping[str, Any]
REPORT_FILE = "distill.json"
REPORT_SCHEMA = "distill-report.v1"
_CHUNK = 256  # texts per scorer call: bounded memory for any data size


class DistillError(ShuntError):
    """Distillation cannot run: no usable records, an unreadable topic, a folder that would be clobbered."""


# --- records ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DistillRecord:
    """One LLM answer kept for training (the fields of ``distill.v1`` that distillation uses)."""

    id: str
    text: str
    llm_label: str
    model_version: str = ""


def parse_records(rows: Iterable[Any]) -> tuple[list[DistillRecord], int]:
    """Usable records and how many rows were skipped (not an object, or no string id/text/llm_label).

    Lenient on purpose: a hand-written file needs only ``id``, ``text`` and ``llm_label``; one bad message
    on a long-lived topic must not block every future retraining.
    """
    records: list[DistillRecord] = []
    skipped = 0
    for row in rows:
        fields = [row.get(key) for key in ("id", "text", "llm_label")] if isinstance(row, dict) else [None]
        if not all(isinstance(value, str) and value for value in fields):
            skipped += 1
            continue
        version = row.get("model_version")
        records.append(DistillRecord(row["id"], row["text"], row["llm_label"], str(version or "")))
    return records, skipped


def dedupe(records: Sequence[DistillRecord]) -> list[DistillRecord]:
    """One record per review id, the last one read: at-least-once delivery may repeat an answer."""
    return list({record.id: record for record in records}.values())


def holdout_side(record_id: str, share: float, seed: int) -> bool:
    """Whether a record is held out: a keyed hash of its id, so a record keeps its side as the topic grows
    and a later retraining never trains on what an earlier one held out."""
    digest = hashlib.blake2b(f"{seed}:{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def split_holdout(
    records: Sequence[DistillRecord], share: float, seed: int
) -> tuple[list[DistillRecord], list[DistillRecord]]:
    """(train, held out) by :func:`holdout_side`."""
    train: list[DistillRecord] = []
    held: list[DistillRecord] = []
    for record in records:
        (held if holdout_side(record.id, share, seed) else train).append(record)
    return train, held


# --- reading ----------------------------------------------------------------------------------------


def read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file of distill records (errors name the file and line)."""
    return datasets.load_jsonl(path)


def read_topic(conf: Mapping[str, Any], topic: str, timeout_s: float = 120.0) -> list[Any]:
    """Every message of ``topic`` from the beginning to the high watermarks seen at the start, decoded
    (None for a value that is not JSON). Reads without a group: nothing is committed, nobody rebalances."""
    try:
        return [_decode(m.value) for m in read_topics(conf, [topic], timeout_s)]
    except TopicReadError as exc:
        raise DistillError(f"cannot read the distill topic: {exc}") from None


def _decode(value: bytes | None) -> Any:
    try:
        return orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        return None


# --- the base model and its original data -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Provenance:
    """Which original data a model was trained on: the domains and the split that held its test set out."""

    domains: tuple[str, ...] | None = None
    split_seed: int = datasets.DEFAULT_SPLIT_SEED
    test_share: float = 0.2

    def as_json(self) -> dict[str, Any]:
        return {"domains": list(self.domains) if self.domains else None, "split_seed": self.split_seed,
                "test_share": self.test_share}  # fmt: skip


def provenance(model: Path) -> Provenance:
    """From config.json ``training_data`` (written by distill), else metrics.json ``options`` (by train)."""
    for name, key, seed_key in (("config.json", "training_data", "split_seed"), ("metrics.json", "options", "seed")):
        path = model / name
        document = orjson.loads(path.read_bytes()) if path.is_file() else {}
        found = document.get(key) if isinstance(document, dict) else None
        if isinstance(found, dict):
            domains = found.get("domains")
            return Provenance(
                tuple(domains) if domains else None,
                int(found.get(seed_key, datasets.DEFAULT_SPLIT_SEED)),
                float(found.get("test_share", 0.2)),
            )
    return Provenance()


@dataclass(frozen=True, slots=True)
class EvalSet:
    """Texts with the label to score against; ``gate`` marks the set a candidate must not be worse on."""

    name: str
    texts: list[str]
    truth: list[str]
    gate: bool = False


def eval_set(name: str, rows: Sequence[Row], gate: bool = False) -> EvalSet:
    return EvalSet(name, [str(r["text"]) for r in rows], [str(r["label"]) for r in rows], gate)


# --- two-stage training -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DistillConfig:
    """Knobs of :func:`run`; docs/l4s.md says why each default is what it is."""

    new_weight: float = 1.0  # one LLM-labelled review counts like one original review ...
    max_new_share: float = 0.5  # ... but together they never carry more than this share of the weight
    llm_accuracy: float = 0.94  # how often the LLM is right: the smoothing of its labels
    holdout_share: float = 0.2
    tolerance: float = 0.005  # the gate: at most this much accuracy lost on the original held-out set
    threshold: float = 0.9  # the router threshold at which shunt rates are reported
    seed: int = 0
    keep_tokenizer: bool = False  # True: reuse the base model's tokenizer instead of one fitted on the mix
    confidence_weights: bool = True  # False: every new record weighs the same (stage 1 is then a diagnostic)
    train: training.TrainConfig = field(default_factory=training.TrainConfig)


@dataclass(frozen=True, slots=True)
class StageOne:
    """Stage 1's model (None when the records were too few to fit it) and each record's confidence."""

    trained: training.TrainedModel | None
    confidence: training.Floats
    note: str


@dataclass(frozen=True, slots=True)
class Candidate:
    trained: training.TrainedModel
    stage1: StageOne
    new_weight: float
    summary: dict[str, Any]


def llm_targets(llm_labels: Sequence[str], labels: Sequence[str], accuracy: float) -> training.Floats:
    """The LLM's labels as probabilities: ``accuracy`` on its label, the rest spread over the others.

    The expected cross-entropy against the (unknown) true label, when the LLM is right with probability
    ``accuracy`` and its errors are spread evenly, is exactly the cross-entropy against these targets.
    """
    hard = training.one_hot(llm_labels, labels)
    rest = (1.0 - accuracy) / (len(labels) - 1)
    out: training.Floats = hard * (accuracy - rest) + rest
    return out


def stage_one(
    texts: Sequence[str], targets: training.Floats, labels: Sequence[str], tokenizer: Tokenizer,
    config: training.TrainConfig,
) -> StageOne:  # fmt: skip
    """Fit the hard reviews alone; confidence = out-of-fold P(LLM label) / max out-of-fold P, so a record
    whose label an unseeing model also picks weighs fully, one it contradicts weighs less."""
    hard = targets.argmax(axis=1)
    counts = np.bincount(hard, minlength=len(labels))
    if counts.min() < config.folds:
        note = f"skipped: needs {config.folds} records per label, has {dict(zip(labels, counts.tolist(), strict=True))}"
        return StageOne(None, np.ones(len(texts)), note)
    trained = training.train(texts, targets, labels, config=config, tokenizer=tokenizer)
    probs = softmax(trained.cv.oof_logits, trained.temperature)
    confidence = probs[np.arange(len(hard)), hard] / probs.max(axis=1)
    return StageOne(trained, confidence, "fitted")


def new_weight(confidence: training.Floats, n_old: int, config: DistillConfig) -> float:
    """The per-record weight of the new data: ``new_weight``, lowered so their total stays within
    ``max_new_share`` of all the weight."""
    cap_total = config.max_new_share / (1.0 - config.max_new_share) * n_old
    total = float(confidence.sum())
    return min(config.new_weight, cap_total / total) if total > 0 else config.new_weight


def two_stage(
    old: Sequence[Row], old_probs: training.Floats, new: Sequence[DistillRecord], labels: Sequence[str], *,
    config: DistillConfig, progress: Progress, tokenizer: Tokenizer | None = None,
) -> Candidate:  # fmt: skip
    """Stage 1 on the new records, stage 2 on the mix; the temperature is refitted against the truth.

    Without ``tokenizer`` one is fitted on the mix, so the new domain's words get whole tokens too."""
    old_texts, new_texts = [str(r["text"]) for r in old], [r.text for r in new]
    train_config = config.train
    if tokenizer is None:
        progress(f"tokenizer: BPE (vocab {train_config.vocab_size}) on {len(old_texts)} original + {len(new)} new")
        tokenizer = training.train_tokenizer(old_texts + new_texts, train_config.vocab_size, train_config.min_frequency)
    new_targets = llm_targets([r.llm_label for r in new], labels, config.llm_accuracy)
    progress(f"stage 1: {len(new)} LLM-labelled hard reviews alone")
    first = stage_one(new_texts, new_targets, labels, tokenizer, train_config)
    confidence = first.confidence if config.confidence_weights else np.ones(len(new))
    weight = new_weight(confidence, len(old), config)
    weights = np.concatenate([np.ones(len(old)), weight * confidence])
    progress(f"stage 2: {len(old)} original (old model's probabilities) + {len(new)} new (weight {weight:.3g})")
    mixed = training.train(
        old_texts + new_texts, np.vstack([old_probs, new_targets]), labels,
        sample_weight=weights, config=train_config, tokenizer=tokenizer, progress=progress,
    )  # fmt: skip
    truth = np.vstack([training.one_hot([str(r["label"]) for r in old], labels), new_targets])
    temperature = fit_temperature(mixed.cv.oof_logits, truth)
    trained = dataclasses.replace(mixed, temperature=temperature)
    summary = _training_summary(first, trained, weight, weights, len(old))
    return Candidate(trained, first, weight, summary)


def _training_summary(
    first: StageOne, trained: training.TrainedModel, weight: float, weights: training.Floats, n_old: int
) -> dict[str, Any]:
    stage1: dict[str, Any] = {"status": first.note, "mean_confidence": round(float(first.confidence.mean()), 4),
                              "agreeing_share": round(float((first.confidence >= 1.0).mean()), 4)}  # fmt: skip
    if first.trained is not None:
        stage1 |= {"c": first.trained.cv.c, "cv_accuracy": round(first.trained.cv.accuracy[first.trained.cv.c], 4)}
    new_total = float(weights[n_old:].sum())
    return {
        "stage1": stage1,
        "stage2": {
            "c": trained.cv.c,
            "cv_accuracy": round(trained.cv.accuracy[trained.cv.c], 4),
            "temperature": round(trained.temperature, 4),
            "new_record_weight": round(weight, 4),
            "new_weight_share": round(new_total / float(weights.sum()), 4),
        },
    }


# --- evaluation and the gate ------------------------------------------------------------------------


def chunked_probs(predict: Callable[[Sequence[str]], training.Floats], texts: Sequence[str]) -> training.Floats:
    """Probabilities for any number of texts, ``_CHUNK`` at a time."""
    if not texts:
        return np.zeros((0, 0))
    return np.concatenate([predict(texts[i : i + _CHUNK]) for i in range(0, len(texts), _CHUNK)])


def stage_probs(trained: training.TrainedModel) -> Callable[[Sequence[str]], training.Floats]:
    """A numpy scorer for an in-memory model (stage 1 is never exported; it is reported for contrast)."""

    def predict(texts: Sequence[str]) -> training.Floats:
        counts = training.count_matrix(trained.tokenizer, texts, trained.model.spec)
        return softmax(trained.model.logits(counts), trained.temperature)

    return predict


def metrics(probs: training.Floats, truth: Sequence[str], labels: Sequence[str], threshold: float) -> dict[str, Any]:
    """Accuracy, shunt rate (share below ``threshold``: what would go to the LLM), accuracy of what the
    small model keeps, and ECE."""
    if len(truth) == 0:
        return {"n": 0, "accuracy": None, "shunt_rate": None, "kept_accuracy": None, "ece": None}
    index = training.one_hot(truth, labels).argmax(axis=1)
    correct = probs.argmax(axis=1) == index
    kept = probs.max(axis=1) >= threshold
    return {
        "n": len(truth),
        "accuracy": float(correct.mean()),
        "shunt_rate": float(1.0 - kept.mean()),
        "kept_accuracy": float(correct[kept].mean()) if kept.any() else None,
        "ece": training.expected_calibration_error(probs, index),
    }


def compare(
    sets: Sequence[EvalSet], models: Mapping[str, Callable[[Sequence[str]], training.Floats]],
    labels: Sequence[str], threshold: float,
) -> dict[str, Any]:  # fmt: skip
    """Per set: each model's metrics, the candidate's change against the base, and which reviews flipped."""
    out: dict[str, Any] = {}
    for found in sets:
        entry: dict[str, Any] = {"gate": found.gate}
        probs = {name: chunked_probs(predict, found.texts) for name, predict in models.items()}
        for name, matrix in probs.items():
            entry[name] = metrics(matrix, found.truth, labels, threshold)
        entry["change"] = {
            key: _delta(entry["candidate"][key], entry["base"][key])
            for key in ("accuracy", "shunt_rate", "kept_accuracy", "ece")
        }
        entry["flips"] = flips(probs["base"], probs["candidate"], found.truth, labels)
        out[found.name] = entry
    return out


def flips(
    base: training.Floats, candidate: training.Floats, truth: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Reviews the candidate fixed and broke, and the standard error of the accuracy change (paired), so a
    change of a point or two on a few hundred reviews can be told from noise."""
    if len(truth) == 0:
        return {"fixed": 0, "broken": 0, "change_se": None}
    index = training.one_hot(truth, labels).argmax(axis=1)
    before, after = base.argmax(axis=1) == index, candidate.argmax(axis=1) == index
    diff = after.astype(np.float64) - before.astype(np.float64)
    n = len(truth)
    se = float(np.sqrt(max(diff.var(), 0.0) / n)) if n > 1 else None
    return {"fixed": int((after & ~before).sum()), "broken": int((before & ~after).sum()), "change_se": se}


def _delta(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else new - old


def verdict(evaluation: Mapping[str, Any], tolerance: float) -> tuple[bool, str]:
    """Passes when the candidate's accuracy on every gated set is at least the base's minus ``tolerance``."""
    for name, entry in evaluation.items():
        change = entry["change"]["accuracy"]
        if entry["gate"] and change is not None and change < -tolerance:
            return False, f"{name}: accuracy {change * 100:+.2f} points, below the tolerance of -{tolerance * 100:.2f}"
    return True, f"not worse than the base beyond {tolerance * 100:.2f} points on the original held-out set"


# --- the run ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inputs:
    """What :func:`run` distills: the base model, the LLM's records, the original data and extra test sets."""

    base: Path
    records: Sequence[DistillRecord]
    old_train: Sequence[Row]
    old_test: Sequence[Row]
    origin: Provenance = field(default_factory=Provenance)
    extra_tests: Mapping[str, Sequence[Row]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The report; ``path`` is the new folder, or None when the candidate was rejected."""

    report: dict[str, Any]
    path: Path | None

    @property
    def passed(self) -> bool:
        return bool(self.report["verdict"]["passed"])


def run(inputs: Inputs, out: Path | None, config: DistillConfig, progress: Progress | None = None) -> Outcome:
    """Retrain, evaluate, gate; write ``<out>/<version>`` (default: beside the base model) if it passes."""
    say = progress or (lambda _message: None)
    base = OnnxScorer.load(inputs.base, max_tokens=config.train.max_tokens)
    sets = _eval_sets(inputs)
    records, data = select_records(inputs.records, base.labels, sets, config)
    train_records, held = split_holdout(records, config.holdout_share, config.seed)
    data |= {"train": len(train_records), "holdout": len(held), "original_train": len(inputs.old_train)}
    if not train_records:
        raise DistillError(f"no distill records left to train on ({data})")
    say(f"scoring {len(inputs.old_train)} original training reviews with the base model (soft targets)")
    old_probs = chunked_probs(base.probabilities, [str(r["text"]) for r in inputs.old_train])
    tokenizer = Tokenizer.from_file(str(inputs.base / "tokenizer.json")) if config.keep_tokenizer else None
    candidate = two_stage(
        inputs.old_train, old_probs, train_records, base.labels, config=config, progress=say, tokenizer=tokenizer
    )
    sets.append(EvalSet("hard_holdout", [r.text for r in held], [r.llm_label for r in held]))
    folder = Path(out) if out is not None else inputs.base.resolve().parent
    return _finish(inputs, base, candidate, sets=sets, folder=folder, config=config, data=data)


def _eval_sets(inputs: Inputs) -> list[EvalSet]:
    sets = [eval_set("original_holdout", inputs.old_test, gate=True)]
    return sets + [eval_set(f"{name}_holdout", rows) for name, rows in inputs.extra_tests.items()]


def select_records(
    records: Sequence[DistillRecord], labels: Sequence[str], sets: Sequence[EvalSet], config: DistillConfig
) -> tuple[list[DistillRecord], dict[str, Any]]:
    """Unique records with a known label whose text is in no evaluation set (a test review is never trained on),
    in id order: partitions interleave differently on every read, and the folds of cross-validation follow
    the order, so without it the same answers could give a different model."""
    unique = sorted(dedupe(records), key=lambda record: record.id)
    known = [r for r in unique if r.llm_label in labels]
    tested = {normalise_text(text) for found in sets for text in found.texts}
    kept = [r for r in known if normalise_text(r.text) not in tested]
    data = {
        "records": len(records),
        "duplicates": len(records) - len(unique),
        "unknown_label": len(unique) - len(known),
        "in_evaluation_sets": len(known) - len(kept),
        "holdout_share": config.holdout_share,
        "by_model_version": dict(Counter(r.model_version or "unknown" for r in kept)),  # who was unsure of them
    }
    return kept, data


def _finish(
    inputs: Inputs, base: OnnxScorer, candidate: Candidate, *, sets: list[EvalSet], folder: Path,
    config: DistillConfig, data: dict[str, Any],
) -> Outcome:  # fmt: skip
    """Write to a staging folder, score what was written, keep it only if it passes the gate."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".distill-"))
    try:
        extra = {"training_data": inputs.origin.as_json(), "distilled_from": base.version}
        version = training.write_model_folder(staging, candidate.trained, name=_name(base.version), extra_config=extra)
        written = OnnxScorer.load(staging, max_tokens=config.train.max_tokens)
        models: dict[str, Callable[[Sequence[str]], training.Floats]] = {
            "base": base.probabilities,
            "candidate": written.probabilities,
        }
        if candidate.stage1.trained is not None:
            models["stage1_only"] = stage_probs(candidate.stage1.trained)
        evaluation = compare(sets, models, base.labels, config.threshold)
        passed, reason = verdict(evaluation, config.tolerance)
        report = _report(
            inputs, (base.version, version), candidate,
            evaluation=evaluation, outcome=(passed, reason), data=data, config=config,
        )  # fmt: skip
        path = _keep(staging, folder / version, report) if passed else None
        report["candidate"]["path"] = str(path) if path else None
        log.info("distill.done", passed=passed, version=version, path=str(path) if path else None)
        return Outcome(report, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _name(base_version: str) -> str:
    """The model name of the base version (``shunt-sentiment-<digest>`` -> ``shunt-sentiment``)."""
    head, _sep, tail = base_version.rpartition("-")
    return head if head and len(tail) == 12 else "shunt-sentiment"


def _keep(staging: Path, final: Path, report: dict[str, Any]) -> Path:
    """Move the staged folder into place in one rename, so a watcher never sees a half-written folder.
    A folder of the same version already holds identical weights (the version is their digest): kept as is."""
    report["candidate"]["path"] = str(final)
    (staging / REPORT_FILE).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    if final.exists():
        log.warning("distill.version_exists", path=str(final))
        return final
    os.chmod(staging, 0o755)  # mkdtemp makes 0700; the service user must be able to read the folder
    os.rename(staging, final)
    return final


def _report(
    inputs: Inputs, versions: tuple[str, str], candidate: Candidate, *, evaluation: dict[str, Any],
    outcome: tuple[bool, str], data: dict[str, Any], config: DistillConfig,
) -> dict[str, Any]:  # fmt: skip
    return {
        "schema": REPORT_SCHEMA,
        "base": {"path": str(inputs.base), "version": versions[0]},
        "candidate": {"version": versions[1], "path": None},
        "verdict": {"passed": outcome[0], "reason": outcome[1], "tolerance": config.tolerance},
        "data": data | {"original": inputs.origin.as_json()},
        "training": candidate.summary,
        "evaluation": evaluation,
        "options": {
            "new_weight": config.new_weight,
            "max_new_share": config.max_new_share,
            "llm_accuracy": config.llm_accuracy,
            "threshold": config.threshold,
            "seed": config.seed,
            "c_grid": list(config.train.c_grid),
        },
    }


# --- promotion --------------------------------------------------------------------------------------


def promote(link: Path, target: Path) -> None:
    """Point the symlink ``link`` at ``target`` atomically: a new symlink beside it, then ``os.replace``.

    A reader resolves either the old folder or the new one, never nothing. The link is relative when the
    target sits in the same tree, so the models folder can move as a whole.
    """
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise DistillError(f"{link} is a real folder or file, not a symlink; point model.path at a symlink")
    if not (Path(target) / "config.json").is_file():
        raise DistillError(f"{target} is not a model folder (no config.json)")
    link.parent.mkdir(parents=True, exist_ok=True)
    pointer = os.path.relpath(Path(target).resolve(), link.parent.resolve())
    temporary = link.parent / f".{link.name}.{uuid.uuid4().hex[:8]}"
    os.symlink(pointer, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    log.info("distill.promoted", link=str(link), target=pointer)
