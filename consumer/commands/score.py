"""``shunt score``: label one text, or a JSONL file, with the small model; one JSON line per review."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from consumer import logs
from consumer.config import DEFAULT_MODEL_DIR
from consumer.offline.datasets import DatasetError, iter_jsonl
from consumer.records import Prediction
from consumer.small.scoring import OnnxScorer


def result_line(review_id: str, prediction: Prediction) -> bytes:
    """The output contract of ``shunt score``: ``{"id", "label", "confidence", "probs"}`` and a newline."""
    line = {"id": review_id, "label": prediction.label, "confidence": prediction.confidence, "probs": prediction.probs}
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def batches(path: Path, size: int) -> Iterator[tuple[list[str], list[str], int]]:
    """(ids, texts, line number reached) per batch; a review without an id gets its line number."""
    ids: list[str] = []
    texts: list[str] = []
    number = 0
    for number, row in iter_jsonl(path):
        text = row.get("text")
        if not isinstance(text, str):
            raise DatasetError(f"{path}:{number}: needs a string field 'text'")
        ids.append(str(row["id"]) if row.get("id") is not None else str(number))
        texts.append(text)
        if len(texts) == size:
            yield ids, texts, number
            ids, texts = [], []
    if texts:
        yield ids, texts, number


def score_file(scorer: OnnxScorer, path: Path, sink: IO[bytes], batch_size: int) -> int:
    """Score every line of ``path`` into ``sink``, with a progress bar (by line) on stderr."""
    done = 0
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("score", total=count_lines(path))
        for ids, texts, line_number in batches(path, batch_size):
            sink.writelines(result_line(i, p) for i, p in zip(ids, scorer.predict(texts), strict=True))
            done += len(texts)
            progress.update(task, completed=line_number)
    return done


def count_lines(path: Path) -> int:
    """Lines in the file, counted in 1 MB blocks (a GB a second), so the bar has a total."""
    count, last = 0, b"\n"
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


@contextlib.contextmanager
def _output(out: Path | None) -> Iterator[IO[bytes]]:
    if out is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with out.open("wb") as handle:
        yield handle


@click.command(name="score")
@click.argument("text", required=False)
@click.option(
    "--file", "in_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="JSONL input: text, id."
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="JSONL output (default: stdout).")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="SHUNT_MODEL__PATH",
    default=DEFAULT_MODEL_DIR,
    show_default=True,
    help="Model folder (env SHUNT_MODEL__PATH).",
)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--max-tokens", type=click.IntRange(8, 4096), default=256, show_default=True)
def command(
    text: str | None, in_file: Path | None, out: Path | None, model_dir: Path, batch_size: int, max_tokens: int
) -> None:
    """Score TEXT, or every line of --file, and print {"id", "label", "confidence", "probs"} per review."""
    if (text is None) == (in_file is None):
        raise click.UsageError("give either TEXT or --file IN.jsonl")
    logs.configure("warning")
    scorer = OnnxScorer.load(model_dir, max_tokens=max_tokens)
    with _output(out) as sink:
        if text is not None:
            sink.write(result_line("1", scorer.predict([text])[0]))
            return
        assert in_file is not None
        count = score_file(scorer, in_file, sink, batch_size)
    click.echo(f"scored {count} reviews with {scorer.version}" + (f" into {out}" if out else ""), err=True)
