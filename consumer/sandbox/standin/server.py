"""Runs the stand-in's app on a port, for tests, the demo, the benchmarks and ``shunt llm-standin``."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import structlog
from aiohttp import web

from consumer.sandbox.standin.app import StandinApp
from consumer.sandbox.standin.config import StandinConfig
from consumer.sandbox.standin.policies import Policy

log = structlog.get_logger(__name__)


class StandinServer:
    """Runs the stand-in on a port. ``async with StandinServer(StandinConfig(...)) as url:`` gives the base
    URL for :class:`~consumer.config.LlmConfig` (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, config: StandinConfig | None = None, policy: Policy | None = None) -> None:
        self.app = StandinApp(config or StandinConfig(), policy)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def __repr__(self) -> str:
        return f"StandinServer(url={self.url!r})"

    async def __aenter__(self) -> str:
        config = self.app.config
        self._runner = web.AppRunner(
            self.app.web_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.host, config.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        self.url = f"http://{host}:{port}/v1"
        log.info("standin_listening", url=self.url, policy=config.policy)
        return self.url

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.app.closing.set()  # let held ("timed out") requests end now
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stats(self) -> dict[str, Any]:
        return self.app.stats()

    def control(self, **changes: Any) -> None:
        """Same as ``POST /control``: e.g. ``control(error_rate=0.3)`` or ``control(storm={"requests": 2})``."""
        self.app.control(changes)
