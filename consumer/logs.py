"""structlog set-up: JSON lines for machines, a console renderer on a TTY, and secrets redacted always."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal

import structlog

_SECRET_KEYS = re.compile(r"(api_key|apikey|password|secret|token_value|authorization)", re.IGNORECASE)
_BEARER = re.compile(r"Bearer\s+[A-Za-z0-9._\-~+/=]+")
_REDACTED = "**********"


class SecretRedactor:
    """Masks known secret values anywhere in an event, and any value whose key looks like a secret."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(s for s in secrets if len(s) >= 4)

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if _SECRET_KEYS.search(key) and value is not None:
                event[key] = _REDACTED
            elif isinstance(value, str):
                event[key] = self.scrub(value)
        return event

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return _BEARER.sub("Bearer " + _REDACTED, text)


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    secrets: Iterable[str] = (),
) -> None:
    """Configure structlog once per process. Logs go to stderr; stdout stays free for command output."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            SecretRedactor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
