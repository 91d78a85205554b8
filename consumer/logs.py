"""structlog set-up: JSON lines for machines, a console renderer on a TTY, and secrets redacted always.

Two nets, both always on. By key: any event field (at any depth) whose name looks like a secret
(:func:`is_secret_key`) is masked. By value: every secret the configuration holds, however it was supplied
(environment, secret file, TOML, a librdkafka setting passed through), is masked wherever it appears in a
string; :func:`consumer.config.load_settings` hands them over with :func:`remember_secrets`, so no command
has to remember to.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal

import structlog

REDACTED = "**********"
_MIN_SECRET = 4
_MIN_LINE = 16
_BEARER = re.compile(r"Bearer\s+[A-Za-z0-9._\-~+/=]+")
# Names of settings and event fields that hold secrets. librdkafka's own (CONFIGURATION.md): sasl.password,
# ssl.key.password, ssl.keystore.password, ssl.key.pem (a private key), ssl_key, sasl.oauthbearer.config
# (clientSecret=...), sasl.oauthbearer.client.secret (and its client.credentials alias),
# sasl.oauthbearer.assertion.private.key.pem/.passphrase; sasl.kerberos.kinit.cmd may embed a password; and
# sasl.jaas.config (Java clients' clientSecret=...). Paths (*.location, *.file, sasl.kerberos.keytab) and
# public certificates (ssl.certificate.pem, ssl.ca.pem) are not secrets and stay visible.
_SECRET_KEYS = re.compile(
    r"password|passwd|secret|passphrase|api_?key|apikey|token_value|authorization"
    r"|key\.pem|^ssl_key$|oauthbearer\.config|jaas|kinit\.cmd",
    re.IGNORECASE,
)
_known: set[str] = set()


def is_secret_key(name: str) -> bool:
    """Whether a setting or event field of this name holds a secret (librdkafka's, ours, any pass-through)."""
    return _SECRET_KEYS.search(name) is not None


def remember_secrets(values: Iterable[str]) -> None:
    """Add secret values every redactor of this process masks from now on (and each long line of a
    multi-line one, such as a PEM key, in case a message quotes only part of it)."""
    for value in values:
        _known.update(_pieces(value))


def _pieces(value: str) -> set[str]:
    pieces = {value} if len(value) >= _MIN_SECRET else set()
    if "\n" in value:
        lines = (line.strip() for line in value.splitlines())
        pieces.update(line for line in lines if len(line) >= _MIN_LINE and not line.startswith("-----"))
    return pieces  # (PEM armour lines, "-----BEGIN PRIVATE KEY-----", are not secret)


class SecretRedactor:
    """Masks known secret values anywhere in an event, and any value whose key looks like a secret."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = {piece for s in secrets for piece in _pieces(s)}

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            event[key] = self._redact(key, value)
        return event

    def _redact(self, key: str, value: Any) -> Any:
        if value is None:
            return None
        if is_secret_key(key):
            return REDACTED
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {k: self._redact(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._redact("", v) for v in value]
        return value

    def scrub(self, text: str) -> str:
        # Longest first, so a secret that contains another is masked whole.
        for secret in sorted(self._secrets | _known, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _BEARER.sub("Bearer " + REDACTED, text)


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
