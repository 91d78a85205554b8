"""``shunt batch``: the batch lane's stage on its own, for a deployment apart from ``shunt run``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from consumer.commands.common import config_option, prune, settings_from


@click.command(name="batch")
@config_option
@click.option("--bootstrap", help="Kafka bootstrap servers HOST:PORT[,...] (kafka.bootstrap_servers).")
@click.option("--group", help="The batch stage's consumer group (batch.group_id; default <kafka.group_id>.batch).")
@click.option("--deferred-topic", help="Topic the deferred reviews wait in (topics.deferred).")
@click.option("--output-topic", help="Topic to write labels to (topics.output).")
@click.option("--llm-url", help="OpenAI-compatible base URL with a Batch API (llm.base_url).")
@click.option("--idle-timeout", type=float, help="Finish and stop once nothing new arrived this long (seconds).")
def command(
    config_path: Path | None,
    bootstrap: str | None,
    group: str | None,
    deferred_topic: str | None,
    output_topic: str | None,
    llm_url: str | None,
    idle_timeout: float | None,
) -> None:
    """Consume the deferred topic, send its reviews through the provider's Batch API, publish the labels.

    The same stage ``shunt run`` starts beside the pipeline when llm.lane is batch or overflow; run it alone
    with batch.in_service = false on the service. A restart finds the batches it created (their metadata
    key) and polls them again instead of paying twice. Expired or failed items go to the online pool or the
    fallback (batch.on_item_failure). Stops on SIGTERM/SIGINT, leaving batches in flight to the next run,
    or with --idle-timeout once everything read is published and committed."""
    overrides = prune(
        {
            "kafka": {"bootstrap_servers": bootstrap},
            "batch": {"group_id": group},
            "topics": {"deferred": deferred_topic, "output": output_topic},
            "llm": {"base_url": llm_url},
            "service": {"idle_timeout_s": idle_timeout},
        }
    )
    settings = settings_from(config_path, overrides)
    from consumer.stream.batchlane import run_alone  # heavy imports only when the stage really starts

    asyncio.run(run_alone(settings))
