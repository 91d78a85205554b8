"""Supervision: a part of the service that dies, or a permanent error, stops the whole service cleanly.

The first failure is kept (``failure``), logged once as the ``fatal`` event and sets ``failed``; the
pipeline then drains within its deadline, commits only what is done, and the command exits FATAL (4).
``/healthz`` fails from that moment on (``healthy()``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from consumer.errors import FatalError

log = structlog.get_logger(__name__)


class Supervisor:
    """Watches tasks and fatal events while the service runs; ``close()`` ends the watch (shutdown)."""

    def __init__(self) -> None:
        self.failed = asyncio.Event()
        self._closed = False
        self._watchers: list[asyncio.Task[None]] = []
        self.failure: FatalError | None = None

    def healthy(self) -> bool:
        """False once a part died or a permanent error happened."""
        return self.failure is None

    def fail(self, error: FatalError, cause: BaseException | None = None, *, announced: bool = False) -> None:
        """Record the first failure and stop the service; later ones only go to the debug log.

        ``announced``: the part already logged the ``fatal`` event itself (the sink names topic and error)."""
        if self.failure is not None:
            log.debug("fatal_again", what=error.what, detail=error.detail)
            return
        self.failure = error
        if not announced:
            log.error("fatal", what=error.what, detail=error.detail, exc_info=cause)
        self.failed.set()

    def watch(self, task: asyncio.Task[object], what: str) -> None:
        """A task that must run until shutdown: its end, for any reason, before ``close()`` is fatal."""
        task.add_done_callback(lambda done: self._ended(done, what))

    def watch_errors(self, task: asyncio.Task[object], what: str) -> None:
        """A task that may end or be cancelled: only an exception is fatal."""
        task.add_done_callback(lambda done: self._raised(done, what))

    def watch_event(self, event: asyncio.Event, error: Callable[[], FatalError | None], what: str) -> None:
        """A part that reports (and logs) a permanent failure by setting ``event``; ``error()`` says which."""

        async def wait() -> None:
            await event.wait()
            self.fail(error() or FatalError(what, "reported a permanent failure"), announced=True)

        self._watchers.append(asyncio.create_task(wait(), name=f"watch-{what}"))

    async def close(self) -> None:
        """Stop watching: what ends from now on ends because the service is stopping."""
        self._closed = True
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _ended(self, task: asyncio.Task[object], what: str) -> None:
        if self._closed:
            return
        if task.cancelled():
            self.fail(FatalError(what, "the task was cancelled"))
        elif (exc := task.exception()) is not None:
            self.fail(FatalError(what, _describe(exc)), exc)
        else:
            self.fail(FatalError(what, "the task ended"))

    def _raised(self, task: asyncio.Task[object], what: str) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.fail(FatalError(what, _describe(exc)), exc)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
