"""Renders the configuration reference (docs/configuration.md) from the typed settings themselves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from consumer.config import ENV_DELIMITER, ENV_PREFIX, Settings
from consumer.pins import NON_SETTINGS_ENV, PINS

HEADER = """# Configuration reference

Generated from `consumer/config.py` by `shunt config docs`; a test fails when this file and the code disagree.

Precedence: defaults < TOML file (`--config FILE` or env `SHUNT_CONFIG`) < environment < command-line flags.
In the TOML file each section is a table (`[llm]`, `rpm = 600`). Secrets (`llm.api_key`, `kafka.sasl_password`)
can also be given as a file path (`*_file`) and are never printed. Values of dict type (`kafka.common`,
`kafka.consumer`, `kafka.producer`, `llm.prices`) are JSON in the environment, e.g.
`SHUNT_KAFKA__COMMON='{"security.protocol": "SASL_SSL"}'`; their keys are librdkafka's own and pass through
untouched.
"""


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value: Any = "(computed)" if info.default_factory.__name__ == "<lambda>" else info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(see section)"
    if isinstance(value, dict):
        return "(see below)" if value else "{}"
    if isinstance(value, Path):
        value = "<package>/models/" + value.name
    text = str(value)
    return f"`{text}`" if text else '`""`'


def _type(info: FieldInfo) -> str:
    text = str(info.annotation)
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    for prefix in ("typing.", "pathlib.", "pydantic.types.", "consumer.config."):
        text = text.replace(prefix, "")
    return text.replace("|", "\\|")


def render() -> str:
    lines = [HEADER]
    for section, section_info in Settings.model_fields.items():
        model = section_info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        lines += [f"\n## `{section}`\n", "| key | environment | type | default | meaning |", "|---|---|---|---|---|"]
        for key, info in model.model_fields.items():
            env = f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}{key.upper()}"
            about = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{section}.{key}` | `{env}` | {_type(info)} | {_default(info)} | {about} |")
    lines.append("\nDefault `llm.prices` (USD per million tokens): see `_default_prices` in `consumer/config.py`.\n")
    lines += _pinned()
    return "\n".join(lines)


def _pinned() -> list[str]:
    """The librdkafka keys the pass-through dicts may not change (``consumer/pins.py``)."""
    lines = [
        "## Pinned librdkafka settings\n",
        "`kafka.common`, `kafka.consumer` and `kafka.producer` may set any librdkafka key except these, whose",
        "values the delivery guarantees rest on; another value is refused at start (exit 2, one line naming the",
        "key). A `SHUNT_` environment variable that names no section above is refused the same way",
        f"({', '.join(f'`{name}`' for name in sorted(NON_SETTINGS_ENV))} are not settings and are allowed).\n",
        "| client | key (aliases) | allowed | why |",
        "|---|---|---|---|",
    ]
    for pin in PINS:
        keys = " / ".join(f"`{key}`" for key in pin.keys)
        lines.append(f"| {pin.role} | {keys} | `{pin.required}` | {pin.why} |")
    return [*lines, ""]
