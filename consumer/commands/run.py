"""``shunt run``: the service."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from consumer.commands.common import config_option, prune, settings_from
from consumer.errors import ExitCode

if TYPE_CHECKING:
    from consumer.stream.pipeline import Pipeline


@click.command(name="run")
@config_option
@click.option("--bootstrap", help="Kafka bootstrap servers HOST:PORT[,...] (kafka.bootstrap_servers).")
@click.option("--group", help="Consumer group id (kafka.group_id).")
@click.option("--input-topic", help="Topic to read reviews from (topics.input).")
@click.option("--output-topic", help="Topic to write labels to (topics.output).")
@click.option("--threshold", type=float, help="Small model decides at or above this confidence (router.threshold).")
@click.option("--llm-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8089/v1 (llm.base_url).")
@click.option("--llm-model", help="Model name sent to the LLM endpoint (llm.model).")
@click.option("--max-messages", type=int, help="Stop after reading this many input messages (service.max_messages).")
@click.option("--idle-timeout", type=float, help="Stop after this many seconds with no input (service.idle_timeout_s).")
@click.option(
    "--drain-timeout",
    type=float,
    help="After --max-messages/--idle-timeout, wait at most this long for in-flight work"
    " (service.batch_drain_timeout_s; default: until it is all done).",
)
@click.option(
    "--create-topics", is_flag=True, default=None, help="Create missing output topics at start (topics.create)."
)
def command(
    config_path: Path | None,
    bootstrap: str | None,
    group: str | None,
    input_topic: str | None,
    output_topic: str | None,
    threshold: float | None,
    llm_url: str | None,
    llm_model: str | None,
    max_messages: int | None,
    idle_timeout: float | None,
    drain_timeout: float | None,
    create_topics: bool | None,
) -> None:
    """Consume reviews, label the confident ones with the small model and the rest with the LLM, publish.

    Stops on SIGTERM/SIGINT (draining in-flight work for up to service.drain_timeout_s), after --max-messages
    or --idle-timeout (finishing every message read), or when a part of it fails.

    Exit codes: 0 done; 1 crashed (a bug); 2 refused to start (configuration, a missing topic); 3 a batch
    stop left messages unfinished (they are read again next run); 4 stopped on a permanent failure.
    """
    overrides = prune(
        {
            "kafka": {"bootstrap_servers": bootstrap, "group_id": group},
            "topics": {"input": input_topic, "output": output_topic, "create": create_topics},
            "router": {"threshold": threshold},
            "llm": {"base_url": llm_url, "model": llm_model},
            "service": {
                "max_messages": max_messages,
                "idle_timeout_s": idle_timeout,
                "batch_drain_timeout_s": drain_timeout,
            },
        }
    )
    settings = settings_from(config_path, overrides)
    from consumer.app import run_service  # heavy imports only when the service really starts

    _exit_for(asyncio.run(run_service(settings, hard_deadline=True)))


def _exit_for(pipeline: Pipeline) -> None:
    """FATAL after a failure; UNFINISHED when a batch stop left messages to read again; else 0."""
    if pipeline.failure is not None:
        click.echo(f"fatal: {pipeline.failure}", err=True)
        sys.exit(ExitCode.FATAL)
    if pipeline.unfinished:
        click.echo(f"unfinished: {pipeline.unfinished} messages will be read again by the next run", err=True)
        if not pipeline.halted:  # a batch stop promised to finish; a signal's drain deadline did its job
            sys.exit(ExitCode.UNFINISHED)
