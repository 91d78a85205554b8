"""Topics: create, delete, wait for leaders, describe. The one copy, for the service, tools, benchmarks and tests.

Keep the AdminClient alive until its futures resolve: dropping it early fails them with ``_DESTROY``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic  # type: ignore[attr-defined, unused-ignore]

from consumer.errors import ShuntError

_TIMEOUT_S = 30.0


class TopicAdminError(ShuntError):
    """A topic could not be created, found or described."""


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic to create: name, partitions, replication factor and topic-level configs."""

    name: str
    partitions: int = 1
    replication: int = 1
    config: Mapping[str, str] = field(default_factory=dict)


class TopicAdmin:
    """A thin typed wrapper over one AdminClient."""

    def __init__(self, conf: Mapping[str, Any]) -> None:
        self._admin = AdminClient(dict(conf))

    def create(self, specs: Sequence[TopicSpec], *, exist_ok: bool = False, timeout_s: float = _TIMEOUT_S) -> None:
        """Create the topics and wait until every partition has a leader."""
        if not specs:
            return
        new = [
            NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication, config=dict(s.config))
            for s in specs
        ]
        for name, future in self._admin.create_topics(new, operation_timeout=timeout_s).items():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                if not (exist_ok and exc.args[0].name() == "TOPIC_ALREADY_EXISTS"):
                    raise TopicAdminError(f"cannot create topic {name!r}: {exc.args[0].str()}") from exc
        for spec in specs:
            self.wait_for_leaders(spec.name, spec.partitions, timeout_s)

    def delete(self, names: Sequence[str], timeout_s: float = _TIMEOUT_S) -> None:
        """Delete the topics; one already gone is not an error."""
        if not names:
            return
        for future in self._admin.delete_topics(list(names), operation_timeout=timeout_s).values():
            with contextlib.suppress(KafkaException):
                future.result(timeout=timeout_s)

    def delete_groups(self, groups: Sequence[str], timeout_s: float = _TIMEOUT_S) -> None:
        """Delete consumer groups; one already gone is not an error."""
        if not groups:
            return
        for future in self._admin.delete_consumer_groups(list(groups), request_timeout=timeout_s).values():
            with contextlib.suppress(KafkaException):
                future.result(timeout=timeout_s)

    def answers(self, timeout_s: float = 2.0) -> bool:
        """The cluster answers a metadata request within ``timeout_s`` (a broker that is up and ready)."""
        try:
            self._admin.list_topics(timeout=timeout_s)
        except KafkaException:
            return False
        return True

    def partitions(self, topic: str, timeout_s: float = 10.0) -> int | None:
        """How many partitions ``topic`` has, or None when it does not exist (or cannot be described)."""
        metadata = self._admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return None
        return len(metadata.partitions)

    def has_leaders(self, topic: str, partitions: int | None = None) -> bool:
        metadata = self._admin.list_topics(topic, timeout=5).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            return False
        if partitions is not None and len(metadata.partitions) != partitions:
            return False
        return all(p.leader >= 0 for p in metadata.partitions.values())

    def wait_for_leaders(self, topic: str, partitions: int | None = None, timeout_s: float = _TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.has_leaders(topic, partitions):
            if time.monotonic() > deadline:
                raise TopicAdminError(f"topic {topic!r} has no leader for every partition after {timeout_s}s")
            time.sleep(0.05)  # re-check broker metadata, with a deadline

    def topic_config(self, topic: str, timeout_s: float = _TIMEOUT_S) -> dict[str, str]:
        """The topic's effective configs (``max.message.bytes``, ``retention.ms``, ...)."""
        resource = ConfigResource("topic", topic)
        try:
            entries = self._admin.describe_configs([resource])[resource].result(timeout=timeout_s)
        except KafkaException as exc:
            raise TopicAdminError(f"cannot describe topic {topic!r}: {exc.args[0].str()}") from exc
        return {name: entry.value for name, entry in entries.items() if entry.value is not None}
