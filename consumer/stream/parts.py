"""What the pipeline drives, as it sees it: the LLM pool and the scoring stage through small protocols, and the
set of parts the app builds and hands over (their lifecycles stay the app's)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from consumer.kafka.sink import KafkaSink
from consumer.observe.meter import Meter
from consumer.records import Review, Scored
from consumer.stream.deferral import NO_DEFERRAL, Deferring
from consumer.stream.loop import AuditPool


class Labeler(AuditPool, Protocol):
    """The LLM pool as the pipeline sees it: what the closed loop needs of it, and the byte backlog and share."""

    def backlog_bytes(self) -> int: ...

    def set_share(self, fraction: float) -> None: ...


class Scoring(Protocol):
    async def each(
        self,
        batches: asyncio.Queue[list[Review] | None],
        handle: Callable[[list[Scored]], Awaitable[None]],
        ahead: int = 2,
    ) -> None: ...


TokenEstimator = Callable[[str], int]


@dataclass(frozen=True)
class Parts:
    """The stages the pipeline drives; the app builds them and owns their lifecycles."""

    sink: KafkaSink
    scoring: Scoring
    llm: Labeler
    meter: Meter
    estimate: TokenEstimator
    deferrer: Deferring = NO_DEFERRAL  # the batch lane's hook (consumer.stream.deferral)
