"""Event-loop plumbing, one copy each: background tasks, cancel-and-wait, waiting on a condition, signals.

Every task is kept and awaited; cancellation is awaited, never fired and forgotten; deadlines use the
monotonic clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_TICK_S = 0.05


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel every task that still runs, and wait until all of them have ended (their errors are dropped)."""
    pending = list(tasks)
    for task in pending:
        if not task.done():
            task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` as a task for the life of the block; cancel it and wait for it at the end."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        await cancel_and_wait([task])


async def wait_until(
    condition: Callable[[], bool], timeout_s: float, *, wake: asyncio.Event | None = None, tick_s: float = _TICK_S
) -> bool:
    """Wait until ``condition()`` holds (True) or ``timeout_s`` passes (False).

    With ``wake``, the condition is checked again each time the event is set (and at least every half
    second); without it, every ``tick_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if wake is None:
            await asyncio.sleep(min(tick_s, left))  # re-check a condition, with a deadline
            continue
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=min(left, 0.5))
    return True


@contextlib.contextmanager
def signal_handlers(on_signal: Callable[[signal.Signals], None]) -> Iterator[Callable[[], None]]:
    """Route SIGINT/SIGTERM to ``on_signal`` for the life of the block.

    Yields a function that installs the handlers again (an embedded service installs its own while it
    runs and removes them when it returns)."""
    loop = asyncio.get_running_loop()

    def install() -> None:
        for sig in SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)

    install()
    try:
        yield install
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
