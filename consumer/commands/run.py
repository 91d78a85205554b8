"""``shunt run``: the service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from consumer.commands.common import config_option, prune, settings_from


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
) -> None:
    """Consume reviews, label the confident ones with the small model and the rest with the LLM, publish.

    Stops on SIGTERM/SIGINT (draining in-flight work first), after --max-messages, or after --idle-timeout.
    """
    overrides = prune(
        {
            "kafka": {"bootstrap_servers": bootstrap, "group_id": group},
            "topics": {"input": input_topic, "output": output_topic},
            "router": {"threshold": threshold},
            "llm": {"base_url": llm_url, "model": llm_model},
            "service": {"max_messages": max_messages, "idle_timeout_s": idle_timeout},
        }
    )
    settings = settings_from(config_path, overrides)
    from consumer.app import run_service  # heavy imports only when the service really starts

    asyncio.run(run_service(settings))
