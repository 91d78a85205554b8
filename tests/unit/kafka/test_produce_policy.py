"""The one produce-error policy: retried, dead-lettered or fatal, by librdkafka error name."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from consumer.errors import ProduceAction, on_produce_error


@pytest.mark.parametrize(
    "code",
    [KafkaError._QUEUE_FULL, KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT,
     KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError._TRANSPORT,
     KafkaError._ALL_BROKERS_DOWN, KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NETWORK_EXCEPTION],
)  # fmt: skip
def test_transient_errors_are_retried(code: int) -> None:
    assert on_produce_error(KafkaError(code).name()) is ProduceAction.RETRY


@pytest.mark.parametrize(
    "code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.RECORD_LIST_TOO_LARGE]
)
def test_errors_about_one_message_dead_letter_it(code: int) -> None:
    assert on_produce_error(KafkaError(code).name()) is ProduceAction.DEAD_LETTER


@pytest.mark.parametrize(
    "code",
    [KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
     KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError._FATAL],
)  # fmt: skip
def test_errors_about_the_service_are_fatal(code: int) -> None:
    assert on_produce_error(KafkaError(code).name()) is ProduceAction.FATAL


def test_a_fatal_idempotent_producer_error_is_fatal_whatever_its_code() -> None:
    assert on_produce_error("OUT_OF_ORDER_SEQUENCE_NUMBER", fatal=True) is ProduceAction.FATAL
    assert on_produce_error("MSG_SIZE_TOO_LARGE", fatal=True) is ProduceAction.FATAL


def test_an_unknown_code_is_retried_not_dropped() -> None:
    assert on_produce_error("SOMETHING_NEW") is ProduceAction.RETRY
