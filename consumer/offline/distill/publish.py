"""Promotion: point the model symlink the service watches at a new folder, atomically."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import structlog

from consumer.offline.distill.records import DistillError

log = structlog.get_logger(__name__)


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
