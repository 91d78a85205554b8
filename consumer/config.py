"""One typed configuration object, read once: defaults < TOML file < environment (``SHUNT_<SECTION>__<KEY>``).

Every section is frozen. Secrets are ``SecretStr`` so they never show in ``repr``, logs or ``config show``.
librdkafka settings pass through untouched; :func:`librdkafka_config` is the one place that builds them.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from consumer import pins
from consumer.configfile import deep_merge, read_toml
from consumer.errors import ConfigError
from consumer.logs import REDACTED, is_secret_key, remember_secrets

ENV_PREFIX = pins.ENV_PREFIX
ENV_DELIMITER = pins.ENV_DELIMITER
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
LibrdkafkaValue = str | int | float | bool


def _packaged_or_repo(name: str) -> Path:
    """A data folder shipped in the wheel (``consumer/_<name>``) or, in a source checkout, the repo's own."""
    packaged = Path(__file__).parent / f"_{name}"
    return packaged if packaged.exists() else Path(__file__).resolve().parent.parent / name


DEFAULT_MODEL_DIR = _packaged_or_repo("models") / "shunt-sentiment"


class Section(BaseModel):
    """Base of every section: frozen, and an unknown key is an error, not a silent typo."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaConfig(Section):
    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Kafka brokers, HOST:PORT[,HOST:PORT...]")
    group_id: str = Field(default="data-shunt", description="consumer group; instances sharing it split the partitions")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password (secret; becomes sasl.password)")
    sasl_password_file: Path | None = Field(default=None, description="file holding the SASL password")
    common: dict[str, LibrdkafkaValue] = Field(default_factory=dict, description="librdkafka settings for every client")
    consumer: dict[str, LibrdkafkaValue] = Field(default_factory=dict, description="librdkafka settings, consumer only")
    producer: dict[str, LibrdkafkaValue] = Field(default_factory=dict, description="librdkafka settings, producer only")

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        for part in value.split(","):
            match = _HOSTPORT.match(part.strip())
            if match is None or not 0 < int(match.group(2)) < 65536:
                raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {part.strip()!r}")
        return value


class TopicsConfig(Section):
    input: str = Field(default="reviews", description="reviews to label (review.v1)")
    output: str = Field(default="reviews.labeled", description="labels, keyed by review id (labeled.v1)")
    dlq: str = Field(default="reviews.dlq", description="messages that could not be labelled (dlq.v1)")
    metrics: str = Field(default="shunt.metrics", description="cost meter windows (metrics.v1)")
    distill: str = Field(default="reviews.distill", description="LLM answers kept as training labels (distill.v1)")
    deferred: str = Field(default="reviews.deferred", description="reviews waiting for the batch lane (deferred.v1)")
    create: bool = Field(
        default=False, description="create a missing output topic at start instead of refusing to start"
    )
    create_partitions: int = Field(default=1, ge=1, le=10_000, description="partitions of a topic created at start")
    create_replication: int = Field(
        default=1, ge=1, le=32, description="replication factor of a topic created at start"
    )


class ModelConfig(Section):
    path: Path = Field(default=DEFAULT_MODEL_DIR, description="model folder: model.onnx, tokenizer.json, config.json")
    max_tokens: int = Field(default=384, ge=8, le=4096, description="reviews are truncated to this many tokens")
    batch_size: int = Field(default=256, ge=1, le=4096, description="micro-batch size for the small model")
    batch_max_wait_ms: float = Field(default=5.0, ge=0, le=10_000, description="longest wait to fill a micro-batch")
    intra_op_threads: int = Field(
        default=1, ge=0, le=256, description="ONNX Runtime threads per scoring worker; 0 lets it choose"
    )
    inter_op_threads: int = Field(default=1, ge=0, le=256, description="ONNX Runtime inter-op threads")
    workers: int = Field(default=2, ge=1, le=64, description="scoring threads, each on its own copy of the model")
    watch_interval_s: float = Field(default=5.0, ge=0, description="how often to look for a new model; 0: never")


class RouterConfig(Section):
    threshold: float = Field(
        default=0.9, ge=0.0, le=1.0, description="the small label is final at or above this confidence"
    )
    fallback: Literal["small", "dlq"] = Field(
        default="small", description="when the LLM gives up: publish the small label flagged, or dead-letter"
    )
    mode: Literal["fixed", "adaptive"] = Field(default="fixed", description="adaptive: audits move the threshold")
    max_error: float = Field(default=0.03, gt=0, lt=1, description="adaptive: small-path error to certify")
    risk_confidence: float = Field(default=0.95, gt=0, lt=1, description="adaptive: confidence of that bound")


class PriceConfig(Section):
    input_per_mtok: float = Field(ge=0, description="USD per million prompt tokens")
    output_per_mtok: float = Field(ge=0, description="USD per million completion tokens")


def _default_prices() -> dict[str, PriceConfig]:
    return {
        "gpt-4o-mini": PriceConfig(input_per_mtok=0.15, output_per_mtok=0.60),
        "gpt-4o": PriceConfig(input_per_mtok=2.50, output_per_mtok=10.00),
        "standin": PriceConfig(input_per_mtok=0.15, output_per_mtok=0.60),
    }


class LlmConfig(Section):
    base_url: str = Field(default="http://127.0.0.1:8089/v1", description="OpenAI-compatible endpoint, up to /v1")
    model: str = Field(default="standin", description="model name sent to the endpoint; also picks the price")
    api_key: SecretStr | None = Field(default=None, description="bearer token (secret)")
    api_key_file: Path | None = Field(default=None, description="file holding the API key")
    rpm: int = Field(default=600, gt=0, description="requests per minute, for the whole group")
    tpm: int = Field(default=200_000, gt=0, description="tokens per minute, for the whole group")
    max_concurrency: int = Field(default=16, gt=0, le=1024, description="requests in flight at once")
    queue_high_water: int = Field(default=2_000, gt=0, description="LLM backlog that pauses consumption")
    queue_low_water: int = Field(default=1_000, ge=0, description="LLM backlog that resumes it")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="TCP/TLS connect timeout")
    read_timeout_s: float = Field(default=30.0, gt=0, description="time allowed for one answer")
    max_attempts: int = Field(default=4, ge=1, le=20, description="tries per review, first included")
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=10, description="retries allowed per first attempt")
    backoff_base_s: float = Field(default=0.5, gt=0, description="first backoff (full jitter, doubling)")
    backoff_max_s: float = Field(default=30.0, gt=0, description="longest backoff")
    breaker_failures: int = Field(default=5, ge=1, description="consecutive failures that open the breaker")
    breaker_reset_s: float = Field(default=10.0, gt=0, description="open time before a half-open probe")
    prompt_mass: float = Field(default=0.95, gt=0, le=1, description="S4L pruning: keep labels up to this mass")
    hint: bool = Field(default=True, description="S4L prompt transferring: give the LLM the small model's guess")
    json_schema_response: bool = Field(
        default=True, description="ask for JSON constrained to the labels (response_format)"
    )
    max_completion_tokens: int = Field(default=20, gt=0, description="answer length cap sent to the endpoint")
    cache_size: int = Field(default=10_000, ge=0, description="LRU of answers for identical reviews; 0 disables")
    cache_max_bytes: int = Field(default=16 << 20, ge=0, description="memory the answer cache may hold, bytes")
    max_queue_bytes: int = Field(
        default=64 << 20, gt=0, description="review bytes the LLM backlog may hold; reaching it pauses consumption"
    )
    max_response_bytes: int = Field(
        default=1 << 20, gt=0, description="a larger response body is a malformed answer (never read whole)"
    )
    max_retry_after_s: float = Field(
        default=60.0, gt=0, description="ceiling on a provider's Retry-After / x-ratelimit-reset-* wait"
    )
    prices: dict[str, PriceConfig] = Field(
        default_factory=_default_prices, description="USD per million input/output tokens, by model"
    )
    lane: Literal["online", "batch", "overflow"] = Field(
        default="online", description="online: the worker pool; batch: the Batch API; overflow: batch when backlogged"
    )

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_water_marks(self) -> LlmConfig:
        if self.queue_low_water >= self.queue_high_water:
            raise ValueError("queue_low_water must be below queue_high_water")
        return self

    def price(self) -> PriceConfig:
        """The price of the configured model; an unknown model costs nothing and says so in config show."""
        return self.prices.get(self.model, PriceConfig(input_per_mtok=0.0, output_per_mtok=0.0))

    def resolved_api_key(self) -> SecretStr | None:
        return _secret(self.api_key, self.api_key_file)


class BatchConfig(Section):
    """The batch lane (``llm.lane`` = batch or overflow): reviews wait in ``topics.deferred`` for the Batch API."""

    max_requests: int = Field(default=1_000, ge=1, le=50_000, description="requests in one batch at most")
    max_wait_s: float = Field(default=60.0, gt=0, description="longest a deferred review waits for its batch to go")
    poll_interval_s: float = Field(default=30.0, gt=0, description="how often a submitted batch is polled")
    price_factor: float = Field(default=0.5, ge=0, le=1, description="batch price as a share of the online price")
    on_item_failure: Literal["online", "fallback"] = Field(
        default="online", description="expired or failed batch items: ask the online pool, or take the fallback"
    )
    group_id: str | None = Field(default=None, description="batch stage consumer group; none: <kafka.group_id>.batch")
    in_service: bool = Field(default=True, description="run the batch stage inside shunt run (false: run shunt batch)")

    def group(self, kafka_group: str) -> str:
        return self.group_id or f"{kafka_group}.batch"


class AuditConfig(Section):
    rate: float = Field(default=0.01, ge=0, le=1, description="share of small-path reviews also asked of the LLM")
    seed: int = Field(default=0, description="seeds which reviews are audited (the same after a restart)")
    min_agreement: float = Field(default=0.9, ge=0, le=1, description="drift alarm below this agreement")
    window: int = Field(default=200, ge=10, le=100_000, description="audit results the drift alarm looks at")


class BudgetConfig(Section):
    usd_per_hour: float | None = Field(default=None, gt=0, description="LLM spend cap, USD/hour; none: no cap")
    min_threshold: float = Field(default=0.5, ge=0, le=1, description="the cap never lowers the threshold below")
    priority: Literal["accuracy", "spend"] = Field(default="accuracy", description="which wins: risk rule or cap")


class MetricsConfig(Section):
    interval_s: float = Field(default=10.0, gt=0, description="one metrics message per window of this length")
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", description="key of this instance's metrics"
    )


class AdminConfig(Section):
    host: str = Field(default="127.0.0.1", description="admin HTTP address (/healthz, /readyz, /metrics)")
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port; the log says which")
    enabled: bool = Field(default=True, description="serve the admin HTTP endpoints")


class ServiceConfig(Section):
    max_messages: int | None = Field(default=None, ge=1, description="stop after this many input messages")
    idle_timeout_s: float | None = Field(default=None, gt=0, description="stop when nothing arrives this long")
    drain_timeout_s: float = Field(default=20.0, gt=0, description="time to finish in-flight work on stop or revoke")
    batch_drain_timeout_s: float | None = Field(
        default=None, gt=0, description="after max_messages/idle_timeout, wait this long for in-flight work; none: all"
    )
    max_text_bytes: int = Field(default=100_000, gt=0, description="longer review text goes to the DLQ")
    max_in_flight: int = Field(default=20_000, gt=0, description="messages read but not yet done, all paths")
    max_in_flight_bytes: int = Field(
        default=128 << 20, gt=0, description="bytes of messages read but not yet done; reaching it pauses the input"
    )
    commit_interval_s: float = Field(default=0.5, gt=0, description="how often done offsets are stored")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="log threshold")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a TTY, JSON lines otherwise"
    )


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`, once, at start."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    llm: LlmConfig = Field(default_factory=LlmConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the TOML file, which arrives as init values.
        return (env_settings, init_settings)


class _InitOnly(Settings):
    """Re-validates already merged values without reading the environment again (CLI flags win)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _secret(value: SecretStr | None, path: Path | None) -> SecretStr | None:
    if value is not None:
        return value
    if path is None:
        return None
    try:
        return SecretStr(path.read_text(encoding="utf-8").strip())
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    env = ENV_PREFIX + ENV_DELIMITER.join(str(part).upper() for part in error["loc"][:2])
    if error["type"] == "extra_forbidden":
        return f"invalid configuration: unknown key {key!r}"
    shown = "<redacted>" if is_secret_key(key) else repr(error.get("input"))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"invalid configuration: {key} (env {env}) = {shown}: {message}"


def load_settings(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read the configuration once. ``overrides`` (from CLI flags) win over the file and the environment."""
    values = read_toml(path) if path is not None else {}
    pins.check_environment(os.environ, set(Settings.model_fields))
    try:
        settings = Settings(**values)
        if overrides:
            data = deep_merge(settings.model_dump(), overrides)
            settings = Settings.model_construct(**dict(_InitOnly(**data)))
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(err) for err in exc.errors())) from None
    settings.llm.resolved_api_key()
    _secret(settings.kafka.sasl_password, settings.kafka.sasl_password_file)
    remember_secrets(secret_values(settings))  # every log redactor of the process masks them from now on
    pins.check_pins(settings.kafka)
    return settings


def librdkafka_config(kafka: KafkaConfig, role: Literal["consumer", "producer", "admin"]) -> dict[str, Any]:
    """The one place that turns our settings into librdkafka's flat dict. User keys win over our defaults."""
    conf: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap_servers}
    if role == "consumer":
        conf |= {
            "group.id": kafka.group_id,
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "auto.commit.interval.ms": 1_000,  # duplicates after a crash are bounded by about this much work
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000,
            "max.poll.interval.ms": 300_000,
        }
    elif role == "producer":
        conf |= {"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"}
    conf |= dict(kafka.common)
    if role in ("consumer", "producer"):
        conf |= dict(getattr(kafka, role))
    password = _secret(kafka.sasl_password, kafka.sasl_password_file)
    if password is not None:
        conf["sasl.password"] = password.get_secret_value()
    return conf


_PASS_THROUGH = ("common", "consumer", "producer")


def redacted_dump(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data with every secret shown as ``**********``: our own
    (``llm.api_key``, ``kafka.sasl_password``) and every librdkafka setting whose name holds a secret
    (:func:`consumer.logs.is_secret_key`: ``ssl.key.pem``, ``sasl.oauthbearer.config``, ``*passphrase*``...)."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    for section, key in (("llm", "api_key"), ("kafka", "sasl_password")):
        if data[section][key] is not None:
            data[section][key] = REDACTED
    for section in _PASS_THROUGH:
        for key in data["kafka"][section]:
            if is_secret_key(key):
                data["kafka"][section][key] = REDACTED
    return data


def secret_values(settings: Settings) -> list[str]:
    """Every secret value the configuration holds, however supplied (inline, secret file, environment,
    TOML, a librdkafka setting passed through), for the log redactor."""
    found = [_secret(settings.llm.api_key, settings.llm.api_key_file)]
    found.append(_secret(settings.kafka.sasl_password, settings.kafka.sasl_password_file))
    values = [s.get_secret_value() for s in found if s is not None]
    for section in _PASS_THROUGH:
        conf: dict[str, LibrdkafkaValue] = getattr(settings.kafka, section)
        values += [str(value) for key, value in conf.items() if is_secret_key(key) and value != ""]
    return values
