"""One error root with typed subclasses, and the one policy that says what each failure leads to."""

from __future__ import annotations

import enum
from typing import ClassVar, Literal


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


class RefusedError(ShuntError):
    """A start-up check failed (a topic the service writes is missing or cannot be described): exit REFUSED."""


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


BreakerEffect = Literal["healthy", "failing", "neutral", "misconfigured"]


class LlmError(ShuntError):
    """A large-model call did not give a usable answer.

    ``breaker`` is what the failure says about the provider, for the circuit breaker (see
    :func:`breaker_effect`): the default, ``failing``, counts towards opening it."""

    breaker: ClassVar[BreakerEffect] = "failing"


class RateLimitedError(LlmError):
    """The provider said 429; ``retry_after_s`` is what it asked us to wait (None when it did not say)."""

    breaker: ClassVar[BreakerEffect] = "neutral"

    def __init__(self, retry_after_s: float | None, detail: str = "rate limited") -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class TransientLlmError(LlmError):
    """Worth retrying: 408/409/5xx, a timeout, a dropped connection."""


class PermanentLlmError(LlmError):
    """Not worth retrying: 4xx other than the above, an answer outside the allowed labels, bad JSON."""


class RequestRejectedError(PermanentLlmError):
    """A 4xx about this one request (400 content filter or context length, 404, 413, 422): fall back for this
    review only. Never counts against the breaker: five poison reviews must not stop everyone's labels."""

    reason = "request_rejected"
    breaker: ClassVar[BreakerEffect] = "neutral"

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class AuthFailedError(RequestRejectedError):
    """401/403: the service is misconfigured (bad or revoked key, no access to the model), not the review.
    The breaker opens at once, readiness fails until an answer comes through again, and the pool logs one
    ``llm_auth_failed`` event; the review itself falls back like any rejected request (``request_rejected``)."""

    breaker: ClassVar[BreakerEffect] = "misconfigured"


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


AUTH_STATUSES = frozenset({401, 403})
RETRIABLE_STATUSES = frozenset({408, 409})  # and 429 (rate limited) and every 5xx


def llm_http_error(status: int, detail: str, retry_after_s: float | None = None) -> LlmError | None:
    """The LLM failure policy's table, from an HTTP status to the error it is (None for a 2xx).

    429 -> rate limited (pool-wide pause); 408/409/5xx -> transient (retried); 401/403 -> misconfigured
    (breaker open, readiness failing); any other 4xx (400/404/413/422...) -> this request only (fallback)."""
    if 200 <= status < 300:
        return None
    if status == 429:
        return RateLimitedError(retry_after_s, detail)
    if status in RETRIABLE_STATUSES or status >= 500:
        return TransientLlmError(detail)
    if status in AUTH_STATUSES:
        return AuthFailedError(status, detail)
    return RequestRejectedError(status, detail)


def breaker_effect(error: BaseException) -> BreakerEffect:
    """What a failed attempt tells the circuit breaker: ``failing`` (5xx, timeouts, garbage) counts towards
    opening it, ``healthy`` (the provider answered, badly) resets the count, ``neutral`` (throttled,
    rejected for this request, cancelled) says nothing, ``misconfigured`` (401/403) opens it at once."""
    return error.breaker if isinstance(error, LlmError) else "neutral"


class ProduceAction(enum.Enum):
    RETRY = "retry"  # transient: produce it again after a pause, for as long as it takes
    DEAD_LETTER = "dead_letter"  # permanent for this one message: dead-letter it with the reason
    FATAL = "fatal"  # permanent for the service: stop cleanly, exit ExitCode.FATAL


# librdkafka error names (KafkaError.name()); the kernel stays free of client types, so codes are strings.
_SERVICE_PERMANENT = frozenset(
    {
        "UNKNOWN_TOPIC_OR_PART",  # the topic (or partition) is not there: auto-creation is off, or it was deleted
        "_UNKNOWN_TOPIC",
        "_UNKNOWN_PARTITION",
        "TOPIC_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
        "SASL_AUTHENTICATION_FAILED",
        "_AUTHENTICATION",
        "INVALID_TOPIC_EXCEPTION",
        "INVALID_REQUIRED_ACKS",
        "POLICY_VIOLATION",
        "PRODUCER_FENCED",
        "_FATAL",
    }
)
_MESSAGE_PERMANENT = frozenset(
    {
        "MSG_SIZE_TOO_LARGE",  # also raised by produce() itself when the message exceeds message.max.bytes
        "RECORD_LIST_TOO_LARGE",
        "INVALID_RECORD",  # e.g. a null key on a compacted topic
        "INVALID_TIMESTAMP",
        "_KEY_SERIALIZATION",
        "_VALUE_SERIALIZATION",
        "_INVALID_ARG",  # the client refused this message's arguments
    }
)


def on_produce_error(code: str, *, fatal: bool = False) -> ProduceAction:
    """Decide, in one place, what a failed produce leads to. ``code`` is the librdkafka error name;
    ``fatal`` is ``KafkaError.fatal()`` (the idempotent producer cannot go on). Anything not known to be
    permanent (queue full, timeouts, leader moves, broker down, and codes this list does not know) is retried."""
    if fatal or code in _SERVICE_PERMANENT:
        return ProduceAction.FATAL
    if code in _MESSAGE_PERMANENT:
        return ProduceAction.DEAD_LETTER
    return ProduceAction.RETRY
