"""Start-up checks: every topic the service writes exists and can be described before anything is consumed.

Without them a missing output topic (auto-creation is off in most clusters) shows only as deliveries retried
for ever while the watermark stands still. A missing topic refuses the start (exit 2, one line naming it)
unless ``topics.create`` asks the service to create it.
"""

from __future__ import annotations

import structlog
from confluent_kafka import KafkaException

from consumer.config import KafkaConfig, TopicsConfig, librdkafka_config
from consumer.errors import RefusedError
from consumer.kafka.admin import TopicAdmin, TopicAdminError, TopicSpec

log = structlog.get_logger(__name__)
_TIMEOUT_S = 10.0


def written_topics(topics: TopicsConfig, *, deferred: bool = False) -> dict[str, str]:
    """Each topic the service produces to, with the setting that names it (``topics.output``...);
    ``deferred``: the batch lane is on, so ``topics.deferred`` too."""
    named = {"topics.output": topics.output, "topics.dlq": topics.dlq, "topics.metrics": topics.metrics}
    named["topics.distill"] = topics.distill
    if deferred:
        named["topics.deferred"] = topics.deferred
    by_topic: dict[str, str] = {}
    for setting, topic in named.items():
        by_topic.setdefault(topic, setting)
    return by_topic


def check_topics(kafka: KafkaConfig, topics: TopicsConfig, *, deferred: bool = False) -> None:
    """Refuse to start (:class:`RefusedError`) unless every written topic exists (or was just created)."""
    admin = TopicAdmin(librdkafka_config(kafka, "admin"))
    for topic, setting in written_topics(topics, deferred=deferred).items():
        try:
            _check_one(admin, topics, topic, setting)
        except KafkaException as exc:
            raise RefusedError(f"cannot check topic {topic!r} ({setting}): {exc.args[0].str()}") from None
        except TopicAdminError as exc:
            raise RefusedError(f"{exc} ({setting})") from None


def _check_one(admin: TopicAdmin, topics: TopicsConfig, topic: str, setting: str) -> None:
    if admin.partitions(topic, _TIMEOUT_S) is None:
        if not topics.create:
            raise RefusedError(
                f"topic {topic!r} ({setting}) does not exist: create it, or start with --create-topics "
                "(topics.create = true)"
            )
        admin.create([TopicSpec(topic, topics.create_partitions, topics.create_replication)], exist_ok=True)
        log.info(
            "topic_created", topic=topic, partitions=topics.create_partitions, replication=topics.create_replication
        )
    admin.topic_config(topic, _TIMEOUT_S)  # describable: authorised, and the broker answers for it
