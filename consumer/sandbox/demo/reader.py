"""The demo's side of Kafka coming out: follows the output, DLQ and metrics topics into the tally."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import structlog

from consumer.kafka.reader import Fetched, TopicReader
from consumer.sandbox.demo.options import FETCH_WAIT_MS, Topics
from consumer.sandbox.demo.stream import TICK_S
from consumer.sandbox.demo.tally import Tally

log = structlog.get_logger(__name__)

_CATCH_UP_TIMEOUT_S = 30.0


class OutputReader:
    """Reads the output, DLQ and metrics topics from the start (a :class:`TopicReader`: no group), into the tally.

    ``async with`` opens the reader and follows the topics until the block ends. The blocking client runs on
    its own thread; every call to it (open, poll, watermarks, close) goes through that one thread."""

    def __init__(self, bootstrap: str, topics: Topics, tally: Tally) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="demo-reader")
        # error_cb: a client-wide error (a dropped connection, which librdkafka re-opens by itself) is logged,
        # not handed to poll as a message, where it would end the reader; partition errors still raise.
        self._conf = {"bootstrap.servers": bootstrap, "client.id": "shunt-demo-reader",
                      "fetch.wait.max.ms": FETCH_WAIT_MS, "error_cb": _client_error}  # fmt: skip
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            topics.output: tally.on_labeled,
            topics.dlq: tally.on_dlq,
            topics.metrics: tally.on_metrics,
        }
        self._reader: TopicReader | None = None
        self._catching_up = False
        self._reached = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OutputReader:
        self._reader = await self._call(TopicReader, self._conf, list(self._handlers))
        self._task = asyncio.create_task(self._follow(), name="demo-reader")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._reader is not None:
            await self._call(self._reader.close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _follow(self) -> None:
        while not self._closing:
            messages, reached = await self._call(self._step, self._catching_up)
            for message in messages:
                self._handle(message)
            if reached:
                self._reached.set()

    def _handle(self, message: Fetched) -> None:
        try:
            self._handlers[message.topic](orjson.loads(message.value or b""))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            # Not a message this demo understands: say so, and keep reading the rest.
            log.warning("demo_unreadable_message", topic=message.topic, error=repr(exc))

    def _step(self, catching_up: bool) -> tuple[list[Fetched], bool]:
        """On the reader's thread: the next messages, and whether the end ``catch_up`` marked is reached."""
        assert self._reader is not None
        messages = [m for m in self._reader.poll(TICK_S) if m.value]
        return messages, catching_up and self._reader.caught_up()

    async def catch_up(self, timeout_s: float = _CATCH_UP_TIMEOUT_S) -> bool:
        """Read everything written so far (to the high watermarks now); False if that takes too long."""
        assert self._reader is not None
        await self._call(self._reader.mark_end)
        self._catching_up = True
        try:
            async with asyncio.timeout(timeout_s):
                await self._reached.wait()
        except TimeoutError:
            return False
        return True


def _client_error(error: Any) -> None:
    log.warning("demo_reader_client_error", error=str(error))
