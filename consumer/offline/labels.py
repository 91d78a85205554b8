"""The one label book: label and replay files, looked up by review id first, then by normalised text.

A row is ``{"id" | "text", "label", "prompt"?, "hard"?, ...}`` (DESIGN.md). A row with a ``prompt`` kind
(``plain`` or ``s4l``) answers only that kind; a row without one answers both, so a plain label file works
as a replay file. An id is the more specific key, so it wins over a text match.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from consumer.errors import ShuntError
from consumer.llm.prompting import normalise_text
from consumer.offline.datasets import DatasetError, iter_jsonl

_KINDS = (None, "plain", "s4l")
_Key = tuple[str, str, str | None]


class LabelFileError(ShuntError, ValueError):
    """A label or replay file row is unusable; the message names the file and line (or the row)."""


def check_row(row: Mapping[str, Any], where: str) -> None:
    """Raise :class:`LabelFileError` naming ``where`` when ``row`` is not a label row."""
    if not isinstance(row.get("id"), str) and not isinstance(row.get("text"), str):
        raise LabelFileError(f"{where}: needs a string 'id' or 'text'")
    if not isinstance(row.get("label"), str) and not (row.get("label") is None and "error" in row):
        raise LabelFileError(f"{where}: needs a string 'label' (or null with an 'error')")
    if row.get("prompt") not in _KINDS:
        raise LabelFileError(f"{where}: 'prompt' must be 'plain' or 's4l', got {row.get('prompt')!r}")


class LabelBook:
    """Rows of a label file, found by review id, else by normalised text; see the module docstring."""

    def __init__(self, rows: Iterable[Mapping[str, Any]], *, checked: bool = False) -> None:
        self._rows: dict[_Key, Mapping[str, Any]] = {}
        for number, row in enumerate(rows, start=1):
            if not checked:
                check_row(row, f"label row {number}")
            kind = row.get("prompt")
            if isinstance(row.get("id"), str):
                self._rows[("id", row["id"], kind)] = row
            if isinstance(row.get("text"), str):
                self._rows[("text", normalise_text(row["text"]), kind)] = row

    @classmethod
    def load(cls, path: Path, what: str = "label file") -> LabelBook:
        """Read a JSON-lines label file; :class:`LabelFileError` names the first bad line."""
        rows = []
        try:
            for number, row in iter_jsonl(path):
                check_row(row, f"{path}:{number}")
                rows.append(row)
        except DatasetError as exc:
            raise LabelFileError(f"{what}: {exc}") from None
        return cls(rows, checked=True)

    def __len__(self) -> int:
        return len(self._rows)

    def find(self, review_id: str | None, text: str, kind: str | None = None) -> Mapping[str, Any] | None:
        """The row for this review (and prompt kind), or None."""
        by_text = normalise_text(text)
        keys: list[_Key] = [("text", by_text, kind), ("text", by_text, None)]
        if review_id is not None:
            keys = [("id", review_id, kind), keys[0], ("id", review_id, None), keys[1]]
        return next((self._rows[k] for k in keys if k in self._rows), None)
