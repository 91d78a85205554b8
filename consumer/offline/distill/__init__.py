"""L4S distillation: distill records and provenance, two-stage training on the LLM's answers, the held-out
gate, the run that writes a new versioned folder only when it passes, and promotion by symlink."""

from consumer.offline.distill import selflabels
from consumer.offline.distill.gate import chunked_probs, compare, flips, metrics, stage_probs, verdict
from consumer.offline.distill.inputs import build_inputs, load_records, load_self_labels, train_config
from consumer.offline.distill.publish import promote
from consumer.offline.distill.records import (
    DistillError,
    DistillRecord,
    EvalSet,
    Provenance,
    Row,
    dedupe,
    eval_set,
    holdout_side,
    parse_records,
    provenance,
    read_file,
    read_topic,
    split_holdout,
)
from consumer.offline.distill.runner import REPORT_FILE, REPORT_SCHEMA, Inputs, Outcome, run, select_records
from consumer.offline.distill.selflabels import SelfLabel
from consumer.offline.distill.stages import (
    Candidate,
    DistillConfig,
    Mix,
    Progress,
    StageOne,
    llm_targets,
    new_weight,
    stage_one,
    two_stage,
)

__all__ = [
    "REPORT_FILE",
    "REPORT_SCHEMA",
    "Candidate",
    "DistillConfig",
    "DistillError",
    "DistillRecord",
    "EvalSet",
    "Inputs",
    "Mix",
    "Outcome",
    "Progress",
    "Provenance",
    "Row",
    "SelfLabel",
    "StageOne",
    "build_inputs",
    "chunked_probs",
    "compare",
    "dedupe",
    "eval_set",
    "flips",
    "holdout_side",
    "llm_targets",
    "load_records",
    "load_self_labels",
    "metrics",
    "new_weight",
    "parse_records",
    "promote",
    "provenance",
    "read_file",
    "read_topic",
    "run",
    "select_records",
    "selflabels",
    "split_holdout",
    "stage_one",
    "stage_probs",
    "train_config",
    "two_stage",
    "verdict",
]
