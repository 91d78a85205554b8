"""``shunt config show``: the effective configuration, secrets redacted."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from consumer.commands.common import config_option, settings_from
from consumer.config import redacted_dump


@click.group(name="config")
def command() -> None:
    """Inspect the configuration."""


@command.command(name="show")
@config_option
def show(config_path: Path | None) -> None:
    """Print the effective configuration (defaults < TOML file < environment) as JSON, secrets redacted."""
    settings = settings_from(config_path)
    click.echo(orjson.dumps(redacted_dump(settings), option=orjson.OPT_INDENT_2).decode())


@command.command(name="docs")
@click.option("--write", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file instead of stdout.")
def docs(write: Path | None) -> None:
    """Print (or write) the configuration reference, generated from the typed settings."""
    from consumer.configdoc import render

    text = render()
    if write is None:
        click.echo(text, nl=False)
    else:
        write.write_text(text, encoding="utf-8")
