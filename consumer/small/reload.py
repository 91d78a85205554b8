"""Hot model reload: watch the model folder, load and warm a new version off the hot path, swap between batches.

Point ``model.path`` at a symlink (for example ``models/current``) and flip it atomically to a new version
folder (``shunt distill --promote`` does). The watcher notices a new target or a new ``shunt_version``,
loads it in a worker thread, scores a few warm-up texts, and only then hands it to the scoring stage. A
folder that fails to load is rejected with a log event and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from consumer.errors import ModelLoadError
from consumer.small.scoring import Scorer

log = structlog.get_logger(__name__)
WARM_UP = ("Works well, very happy with it.", "Broke after a day, avoid.", "")


def fingerprint(path: Path) -> str:
    """What identifies the model a path serves now: its resolved folder and its config's bytes."""
    real = os.path.realpath(path)
    try:
        stat = os.stat(os.path.join(real, "config.json"))
        onnx = os.stat(os.path.join(real, "model.onnx"))
    except OSError:
        return f"{real}:missing"
    return f"{real}:{stat.st_mtime_ns}:{stat.st_size}:{onnx.st_mtime_ns}:{onnx.st_size}"


class ModelWatcher:
    """Polls ``path`` every ``interval_s``; calls ``swap`` with a loaded, warmed scorer when it changes."""

    def __init__(
        self, path: Path, interval_s: float, load: Callable[[Path], Scorer], swap: Callable[[Scorer], object]
    ) -> None:
        self._path, self._interval_s, self._load, self._swap = path, interval_s, load, swap
        self._seen = fingerprint(path)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)  # a polling period, not a synchronisation
            try:
                await self.check()
            except Exception:  # nothing unexpected may end the watcher: the old model keeps serving
                log.exception("model_watch_failed", path=str(self._path))

    async def check(self) -> bool:
        """Look once; True when a new model was swapped in."""
        current = fingerprint(self._path)
        if current == self._seen:
            return False
        self._seen = current  # a rejected folder is not retried until it changes again
        try:
            scorer = await asyncio.get_running_loop().run_in_executor(None, self._load_and_warm)
            self._swap(scorer)  # may refuse too (other labels than the running model's)
        except ModelLoadError as exc:
            log.error("model_reload_rejected", path=str(self._path), reason=str(exc))
            return False
        log.info("model_reloaded", path=current.split(":", 1)[0], version=scorer.version)
        return True

    def _load_and_warm(self) -> Scorer:
        scorer = self._load(self._path)
        try:
            scorer.predict(list(WARM_UP))
        except Exception as exc:  # a graph that loads but cannot run is just as broken
            raise ModelLoadError(f"model at {self._path} failed its warm-up: {exc}") from exc
        return scorer
