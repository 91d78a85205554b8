from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import structlog
from confluent_kafka.admin import AdminClient

from tests.support import kafka


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return kafka.bootstrap()


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def topics(kafka_admin: AdminClient) -> Iterator[kafka.Topics]:
    made = kafka.Topics(kafka_admin)
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
