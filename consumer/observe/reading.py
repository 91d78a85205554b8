"""Reads the metrics topic back: schema-valid metrics.v1 messages of the matching groups, without a group.

Built on :class:`~consumer.kafka.reader.TopicReader`, so ``shunt report`` and ``shunt top`` commit nothing and
make nobody rebalance. A message that is not valid metrics.v1 is counted in ``skipped`` and left out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from fnmatch import fnmatchcase
from types import TracebackType
from typing import Any

import orjson

from consumer import contracts
from consumer.config import Settings, librdkafka_config
from consumer.contracts import ContractError
from consumer.kafka.reader import Fetched, TopicReader, TopicReadError


class MetricsReader:
    """Reads metrics.v1 messages of ``topic`` from ``since_ms`` (or the start) whose group matches the glob.

    ``read_all`` yields what was on the topic when the reader opened; ``poll`` then follows it."""

    def __init__(
        self, conf: Mapping[str, Any], topic: str, *, since_ms: int | None = None, group_filter: str = "*"
    ) -> None:
        self.topic = topic
        self.group_filter = group_filter
        self.skipped = 0
        self._since_ms = since_ms
        self._reader = TopicReader(conf, [topic], since_ms=since_ms)

    @classmethod
    def from_settings(cls, settings: Settings, since_ms: int | None = None, group_filter: str = "*") -> MetricsReader:
        """A reader of ``topics.metrics`` with the Kafka connection settings of the service."""
        conf = librdkafka_config(settings.kafka, "consumer")
        return cls(conf, settings.topics.metrics, since_ms=since_ms, group_filter=group_filter)

    def poll(self, timeout_s: float) -> list[dict[str, Any]]:
        """The next decoded, schema-valid messages of the matching groups (empty when none came in time)."""
        out = []
        for fetched in self._reader.poll(timeout_s):
            if self._before_period(fetched):
                continue  # a late write stamped before the period (the start offset is the first one in it)
            message = self._decode(fetched.value)
            if message is not None and fnmatchcase(message["group_id"], self.group_filter):
                out.append(message)
        return out

    def _before_period(self, fetched: Fetched) -> bool:
        if self._since_ms is None:
            return False
        return fetched.timestamp_ms is None or fetched.timestamp_ms < self._since_ms

    def _decode(self, raw: bytes | None) -> dict[str, Any] | None:
        try:
            message: dict[str, Any] = contracts.loads(raw or b"")
            contracts.validate("metrics", message)
        except (orjson.JSONDecodeError, ContractError):
            self.skipped += 1
            return None
        return message

    def caught_up(self) -> bool:
        """Everything that was on the topic when the reader opened has been read."""
        return self._reader.caught_up()

    def read_all(self, timeout_s: float = 60.0) -> Iterator[dict[str, Any]]:
        """Every message up to the end the topic had at open (and any that came meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while not self.caught_up():
            if time.monotonic() > deadline:
                raise TopicReadError(f"timed out after {timeout_s}s reading {self.topic!r}")
            yield from self.poll(0.5)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> MetricsReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
