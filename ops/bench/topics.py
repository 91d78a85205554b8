"""Uniquely named benchmark topics, created and deleted with consumer.kafka.admin, every one gone at the end.

Output topics use ``LogAppendTime``, so an output message's timestamp is the moment the broker made it
visible downstream; input topics keep ``CreateTime`` (the moment the benchmark's producer called ``produce``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from consumer.kafka.admin import TopicAdmin, TopicSpec

LOG_APPEND = {"message.timestamp.type": "LogAppendTime"}
SERVICE_TOPICS = ("output", "dlq", "distill", "metrics")
_TIMEOUT_S = 60.0


def run_id() -> str:
    return uuid.uuid4().hex[:6]


class Topics:
    """Creates uniquely named topics and deletes every one of them at the end (a 1M backlog is ~0.5 GB)."""

    def __init__(self, bootstrap: str, run: str) -> None:
        self.bootstrap = bootstrap
        self.run_id = run
        self._admin = TopicAdmin({"bootstrap.servers": bootstrap})
        self.created: list[str] = []

    def __enter__(self) -> Topics:
        return self

    def __exit__(self, *_: object) -> None:
        self.delete(self.created)

    def make(self, prefix: str, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        """A new topic, every partition with a leader."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", prefix)  # Kafka allows only these in topic names
        name = f"bench-{self.run_id}-{safe}-{uuid.uuid4().hex[:6]}"
        self._admin.create([TopicSpec(name, partitions, config=config or {})])
        self.created.append(name)
        return name

    def for_service(self, label: str) -> dict[str, str]:
        """A fresh output, DLQ, distill and metrics topic, as ``topics__*`` service settings."""
        return {f"topics__{kind}": self.make(f"{label}-{kind}", 1, LOG_APPEND) for kind in SERVICE_TOPICS}

    def delete(self, names: Sequence[str]) -> None:
        doomed = list(names)
        self._admin.delete(doomed, _TIMEOUT_S)
        self.created = [name for name in self.created if name not in doomed]

    def delete_outputs(self, settings: Mapping[str, Any]) -> None:
        """The output, DLQ, distill and metrics topics of one service run (not its input)."""
        self.delete([settings[f"topics__{kind}"] for kind in SERVICE_TOPICS if f"topics__{kind}" in settings])
