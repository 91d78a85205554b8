"""One error root with typed subclasses, and the one policy that says what each failure leads to."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What ``shunt run`` exits with, so an orchestrator and an operator can tell the endings apart."""

    OK = 0
    CRASHED = 1  # a bug: an exception nobody expected
    REFUSED = 2  # configuration or start-up checks refused to start (one line says why)
    UNFINISHED = 3  # a batch-mode stop (--max-messages/--idle-timeout) left work to be read again
    FATAL = 4  # stopped cleanly on an error it cannot handle: a permanent produce error, a task that died
    INTERRUPTED = 130


class ShuntError(Exception):
    """Root of every error the service raises on purpose."""


class FatalError(ShuntError):
    """The service cannot go on (permanent for the service); it stops cleanly and exits ``ExitCode.FATAL``.

    ``what`` names the part that failed (a topic, a task), for the one ``fatal`` log event."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail


class ConfigError(ShuntError):
    """The configuration is invalid; the message names the key, the value and what is allowed."""


class ModelLoadError(ShuntError):
    """A model folder cannot be served (missing file, unexpected graph inputs, label mismatch)."""


class BadInputError(ShuntError):
    """An input message cannot be processed; ``reason`` is a machine-readable code for the DLQ."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class LlmError(ShuntError):
    """A large-model call did not give a usable answer."""


class RateLimitedError(LlmError):
    """The provider said 429; ``retry_after_s`` is what it asked us to wait (None when it did not say)."""

    def __init__(self, retry_after_s: float | None, detail: str = "rate limited") -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class TransientLlmError(LlmError):
    """Worth retrying: 408/409/5xx, a timeout, a dropped connection."""


class PermanentLlmError(LlmError):
    """Not worth retrying: 4xx other than the above, an answer outside the allowed labels, bad JSON."""


class GaveUpError(LlmError):
    """The pool stopped trying: retries spent, retry budget exhausted, or the circuit breaker is open."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Action(enum.Enum):
    RETRY = "retry"
    FALLBACK = "fallback"


def on_llm_failure(error: LlmError, attempt: int, max_attempts: int, budget_left: bool) -> Action:
    """Decide, in one place, whether a failed LLM call is retried or handed to the fallback policy."""
    if isinstance(error, PermanentLlmError | GaveUpError):
        return Action.FALLBACK
    if attempt >= max_attempts or not budget_left:
        return Action.FALLBACK
    return Action.RETRY
