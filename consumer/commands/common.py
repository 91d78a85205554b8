"""Options and helpers that several commands share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from consumer import logs
from consumer.config import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def config_option(func: F) -> F:
    decorated: F = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="SHUNT_CONFIG",
        help="TOML configuration file (env SHUNT_CONFIG). Environment variables SHUNT_<SECTION>__<KEY> win over it.",
    )(func)
    return decorated


def settings_from(config_path: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load the settings once and configure logging with every secret known to the redactor."""
    settings = load_settings(config_path, overrides)
    secrets = [s.get_secret_value() for s in (settings.llm.resolved_api_key(), settings.kafka.sasl_password) if s]
    logs.configure(settings.service.log_level, settings.service.log_format, secrets)
    return settings


def prune(values: dict[str, Any]) -> dict[str, Any]:
    """Drop CLI flags the user did not give, so they do not override the file or the environment."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            nested = prune(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out
