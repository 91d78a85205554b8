"""The peer in the comparison: a Quix Streams app doing the service's small-path job the way its docs show.

    .bench/venv/bin/python -m ops.bench.peer_quix --bootstrap HOST:PORT --input T --output T --count N

``app.dataframe(topic).apply(score).to_topic(output)``: every message is parsed as JSON, scored by the same
model folder with the project's own scorer (one text per call: Quix hands ``apply`` one value at a time),
and written as JSON. It stops after ``--count`` outputs. It runs in its own venv (``.bench/venv``, the
``bench`` extra) because quixstreams pins a confluent-kafka older than the service's; :func:`command` is
how ``ops.bench.compare`` starts it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".bench" / "venv" / "bin" / "python"
SETUP = "python -m venv .bench/venv && .bench/venv/bin/pip install -e '.[bench]'"


def command(bootstrap: str, source: str, output: str, count: int, group: str) -> list[str]:
    """The peer's command line (its own venv's interpreter, made on first use)."""
    ensure_venv()
    args = ["--bootstrap", bootstrap, "--input", source, "--output", output, "--count", str(count)]
    return [str(VENV_PYTHON), "-m", "ops.bench.peer_quix", *args, "--group", group]


def ensure_venv() -> None:
    """Create ``.bench/venv`` with the ``bench`` extra unless it is there (a minute or two, once)."""
    if VENV_PYTHON.exists():
        return
    print(f"peer: creating its venv (once): {SETUP}", file=sys.stderr, flush=True)
    venv = VENV_PYTHON.parents[1]
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "-e", f"{REPO}[bench]"], check=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(venv, ignore_errors=True)  # a half-made venv would be taken for a good one next time
        raise SystemExit(f"the Quix Streams peer's venv could not be made ({exc}); try by hand: {SETUP}") from None


def env() -> dict[str, str]:
    """The peer's environment: this one, with the repository importable (the scorer comes from it)."""
    return dict(os.environ) | {"PYTHONPATH": str(REPO)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--bootstrap", "--input", "--output", "--group"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()

    # Imported here: quixstreams exists only in the bench venv, and --help needs neither it nor the model.
    from quixstreams import Application

    from consumer.config import DEFAULT_MODEL_DIR
    from consumer.small.scoring import OnnxScorer

    scorer = OnnxScorer.load(DEFAULT_MODEL_DIR)  # the library's defaults, as a user would load it

    def score(value: dict[str, Any]) -> dict[str, Any]:
        (prediction,) = scorer.predict([value["text"]])
        return {
            "id": value["id"],
            "label": prediction.label,
            "confidence": prediction.confidence,
            "probs": prediction.probs,
            "model_version": prediction.model_version,
            "source": "small",
        }

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        auto_create_topics=False,
        loglevel="WARNING",
    )
    source = app.topic(args.input, value_deserializer="json")
    output = app.topic(args.output, value_serializer="json")
    app.dataframe(source).apply(score).to_topic(output)
    app.run(count=args.count, timeout=120, collect=False)


if __name__ == "__main__":
    main()
