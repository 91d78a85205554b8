"""Delivery reports from librdkafka's threads to the event loop, many per wake-up of the loop.

The producer calls a message's report on whichever thread polls or flushes it; one ``call_soon_threadsafe``
per report would wake the loop (a write to its self-pipe) once per message. Reports are queued instead,
and the loop is woken once for all that came meanwhile."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class DeliveryReports(Generic[Item]):
    """Items put from any thread, handed to ``handle`` on the loop in bursts, in the order they came."""

    def __init__(self, handle: Callable[[list[Item]], None]) -> None:
        self._handle = handle
        self._items: collections.deque[Item] = collections.deque()
        self._scheduled = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def put(self, item: Item) -> None:
        """Any thread. A wake-up is scheduled only when none is pending; a report that races with a drain
        at worst schedules one more (empty) drain, it is never left behind."""
        self._items.append(item)
        loop = self.loop
        if not self._scheduled and loop is not None and not loop.is_closed():
            self._scheduled = True
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._scheduled = False  # before taking the items: a report appended from now on schedules again
        items = self._items
        self._handle([items.popleft() for _ in range(len(items))])
