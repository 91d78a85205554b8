"""L4S: retrain the small model from the LLM's answers, gate it, and publish it for hot reload.

Every fresh LLM answer the service publishes to the distill topic (``distill.v1``) is a free label for a
review the small model was unsure of. Two-stage confidence distillation turns them into a new model:

* **stage 1** fits the LLM-labelled hard reviews alone. Its out-of-fold probabilities say, for each
  record, whether a model that never saw that record agrees with the LLM: the record's *confidence*.
* **stage 2** fits the mix: the original training data as the base model was trained on it (so it does
  not forget), the stream's self-labels (the small path's own outputs: the rest of a new domain), and the
  hard reviews with the LLM's labels smoothed by the LLM's accuracy, each weighted by its stage-1
  confidence, their total weight capped so they never swamp.

The candidate is scored with the service's own scorer on the original held-out split (the gate: not
worse than the base model beyond a tolerance) and on a held-out share of the distill records that no
stage ever trains on. Only a candidate that passes becomes a new versioned folder; :func:`promote`
flips a symlink to it atomically. docs/l4s.md explains each choice and shows a full experiment.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog
from tokenizers import Tokenizer

from consumer.llm.prompting import normalise_text
from consumer.offline import train as training
from consumer.offline.distill.gate import chunked_probs, compare, stage_probs, verdict
from consumer.offline.distill.records import (
    DistillError,
    DistillRecord,
    EvalSet,
    Provenance,
    Row,
    dedupe,
    eval_set,
    split_holdout,
)
from consumer.offline.distill.selflabels import SelfLabel, usable
from consumer.offline.distill.stages import Candidate, DistillConfig, Mix, Progress, two_stage
from consumer.small.scoring import OnnxScorer

log = structlog.get_logger(__name__)

REPORT_FILE = "distill.json"
REPORT_SCHEMA = "distill-report.v1"


@dataclass(frozen=True, slots=True)
class Inputs:
    """What :func:`run` distills: the base model, the LLM's records, the original data and extra test sets."""

    base: Path
    records: Sequence[DistillRecord]
    old_train: Sequence[Row]
    old_test: Sequence[Row]
    origin: Provenance = field(default_factory=Provenance)
    extra_tests: Mapping[str, Sequence[Row]] = field(default_factory=dict)
    self_labels: Sequence[SelfLabel] = ()
    extra_rows: Sequence[Row] = ()  # joined every fit of the base model at origin.uci_weight (the UCI sentences)


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
    self_labels = usable(inputs.self_labels, _tested(sets), {r.id for r in records}, base.labels)
    data["self_labels"] = len(self_labels)
    mix = Mix(inputs.old_train, _old_targets(inputs, base, config), self_labels, _extra(inputs, base.labels))
    tokenizer = Tokenizer.from_file(str(inputs.base / "tokenizer.json")) if config.keep_tokenizer else None
    candidate = two_stage(mix, train_records, base.labels, config=config, progress=say, tokenizer=tokenizer)
    sets.append(EvalSet("hard_holdout", [r.text for r in held], [r.llm_label for r in held]))
    folder = Path(out) if out is not None else inputs.base.resolve().parent
    return _finish(inputs, base, candidate, sets=sets, folder=folder, config=config, data=data)


def _old_targets(inputs: Inputs, base: OnnxScorer, config: DistillConfig) -> training.Floats | None:
    """None: the original rows train on their labels; with ``original_targets="base"``, the base model's
    probabilities, for a base model that knows more than its training labels say (a user's own teacher)."""
    if config.original_targets != "base":
        return None
    texts = [str(r["text"]) for r in inputs.old_train]
    log.info("distill.scoring_original", reviews=len(texts))
    return chunked_probs(base.probabilities, texts)


def _extra(inputs: Inputs, labels: Sequence[str]) -> training.ExtraData | None:
    if not inputs.extra_rows or inputs.origin.uci_weight <= 0:
        return None
    rows = inputs.extra_rows
    targets = training.one_hot([str(r["label"]) for r in rows], labels)
    return training.ExtraData([str(r["text"]) for r in rows], targets, inputs.origin.uci_weight)


def _tested(sets: Sequence[EvalSet]) -> set[str]:
    return {normalise_text(text) for found in sets for text in found.texts}


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
    tested = _tested(sets)
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
            "original_targets": config.original_targets,
            "self_weight": config.self_weight,
            "final_model": config.train.final_model,
        },
    }
