"""The librdkafka settings the service's guarantees rest on, and the check of ``SHUNT_`` environment names.

The pass-through dicts (``kafka.common``, ``kafka.consumer``, ``kafka.producer``) may tune librdkafka freely,
except for the keys below: changing one of them would switch off at-least-once delivery or the idempotent
producer, so it is refused at start with one line naming the key. docs/configuration.md lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from consumer.errors import ConfigError

if TYPE_CHECKING:
    from consumer.config import KafkaConfig

ENV_PREFIX = "SHUNT_"
ENV_DELIMITER = "__"
# SHUNT_ variables read by the command line and the scripts, not settings sections.
NON_SETTINGS_ENV = frozenset({"SHUNT_CONFIG", "SHUNT_VENV", "SHUNT_DATA_DIR"})


@dataclass(frozen=True, slots=True)
class Pin:
    """A librdkafka setting the service's guarantees depend on: the pass-through dicts may not change it."""

    role: Literal["consumer", "producer"]
    keys: tuple[str, ...]  # the name and librdkafka's aliases of it
    allowed: Callable[[str], bool]
    required: str
    why: str


def _one_of(*values: str) -> Callable[[str], bool]:
    return lambda value: value in values


def _int_between(low: int, high: int) -> Callable[[str], bool]:
    return lambda value: value.lstrip("-").isdigit() and low <= int(value) <= high


PINS = (
    Pin("consumer", ("enable.auto.offset.store",), _one_of("false", "0"), "false",
        "an offset is stored only once every output of its message is delivered (at-least-once)"),
    Pin("consumer", ("enable.auto.commit",), _one_of("true", "1"), "true",
        "stored offsets reach the broker through the auto-committer; the service commits itself only on revoke/stop"),
    Pin("consumer", ("isolation.level",), _one_of("read_committed"), "read_committed",
        "reviews from aborted transactions are not reviews"),
    Pin("consumer", ("auto.offset.reset",), _one_of("earliest", "smallest", "beginning"), "earliest",
        "a new group, or an offset past retention, starts at the oldest message instead of skipping unread ones"),
    Pin("producer", ("enable.idempotence",), _one_of("true", "1"), "true",
        "a retried produce neither duplicates nor reorders outputs"),
    Pin("producer", ("acks", "request.required.acks"), _one_of("all", "-1"), "all",
        "an output counts as delivered only once every in-sync replica has it"),
    Pin("producer", ("max.in.flight", "max.in.flight.requests.per.connection"), _int_between(1, 5), "1..5",
        "the idempotent producer keeps order only with at most 5 requests in flight"),
    Pin("producer", ("retries", "message.send.max.retries"), _int_between(1, 2**31 - 1), ">= 1",
        "the idempotent producer needs retries"),
    Pin("producer", ("delivery.report.only.error",), _one_of("false", "0"), "false",
        "a message is done only when the delivery report of each of its outputs says so"),
    Pin("producer", ("transactional.id",), lambda _value: False, "(unset)",
        "the service does not run transactions; a transactional producer would never commit its outputs"),
)  # fmt: skip


def check_pins(kafka: KafkaConfig) -> None:
    """Refuse a pass-through setting that would switch off at-least-once or the idempotent producer."""
    for pin in PINS:
        for section in ("common", pin.role):
            given: dict[str, object] = getattr(kafka, section)
            for key in pin.keys:
                if key in given and not pin.allowed(str(given[key]).strip().lower()):
                    raise ConfigError(
                        f"invalid configuration: kafka.{section}[{key!r}] (env {ENV_PREFIX}KAFKA{ENV_DELIMITER}"
                        f"{section.upper()}) = {given[key]!r}: the service pins it to {pin.required}: {pin.why}"
                    )


def check_environment(environ: Mapping[str, str], sections: set[str]) -> None:
    """A ``SHUNT_`` variable must name a known section (or be one of the few non-settings ones)."""
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_SETTINGS_ENV:
            continue
        section = upper.removeprefix(ENV_PREFIX).split(ENV_DELIMITER, 1)[0].lower()
        if section not in sections:
            raise ConfigError(
                f"invalid configuration: environment variable {name} names no section "
                f"(known: {', '.join(sorted(sections))}; form {ENV_PREFIX}<SECTION>{ENV_DELIMITER}<KEY>)"
            )
