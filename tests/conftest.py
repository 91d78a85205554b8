from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import structlog
from confluent_kafka.admin import AdminClient

from consumer.kafka.admin import TopicAdmin
from tests.support import kafka


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return kafka.bootstrap()


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    """The raw client, for what TopicAdmin does not cover (describing consumer groups)."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture(scope="session")
def topic_admin(kafka_bootstrap: str) -> TopicAdmin:
    return TopicAdmin({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def topics(topic_admin: TopicAdmin) -> Iterator[kafka.Topics]:
    made = kafka.Topics(topic_admin)
    yield made
    made.cleanup()


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Commands run in-process configure structlog globally; put it back so log-capturing tests stay honest."""
    yield
    structlog.reset_defaults()


MEASUREMENTS: list[str] = []


@pytest.fixture
def report() -> Callable[[str], None]:
    """Tests record what they measured (duplicates, drain time, RSS); the run prints it at the end."""
    return MEASUREMENTS.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASUREMENTS:
        terminalreporter.section("measurements")
        for line in MEASUREMENTS:
            terminalreporter.write_line(line)
