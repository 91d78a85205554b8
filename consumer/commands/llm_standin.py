"""``shunt llm-standin``: the stand-in OpenAI-compatible LLM server (see :mod:`consumer.sandbox.standin`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from consumer import logs
from consumer.aio import signal_handlers
from consumer.sandbox.standin import Faults, StandinConfig, StandinServer, parse_latency


def _latency(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, float]:
    try:
        return parse_latency(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(name="llm-standin")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8089, show_default=True, help="0 picks a free port.")
@click.option("--policy", type=click.Choice(["replay", "oracle", "first"]), default="first", show_default=True,
              help="replay: the label FILE records; oracle: FILE's true label with probability --accuracy; "
                   "first: the first offered label.")  # fmt: skip
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSON lines {"id"|"text", "label", "hard"?}; needed by replay and oracle.')  # fmt: skip
@click.option("--accuracy", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="oracle: P(right).")
@click.option("--hard-accuracy", type=click.FloatRange(0, 1), help='oracle: P(right) for rows with "hard": true.')
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds faults, latency and the oracle.")
@click.option("--rpm", type=click.IntRange(min=1), help="Own requests/minute limit (429 above it).")
@click.option("--tpm", type=click.IntRange(min=1), help="Own tokens/minute limit (429 above it).")
@click.option("--latency-ms", default="0-0", show_default=True, callback=_latency, help="Uniform latency LO-HI.")
@click.option("--error-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Share of 5xx.")
@click.option("--timeout-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests held for --hang-s.")  # fmt: skip
@click.option("--hang-s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="How long a 'timed out' request is held (longer than the client's read timeout).")  # fmt: skip
@click.option("--malformed-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of 200s with a body that is not a usable completion.")  # fmt: skip
@click.option("--out-of-set-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of answers with a label that was not offered.")  # fmt: skip
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
def command(**options: Any) -> None:
    """Run the stand-in OpenAI-compatible LLM server until interrupted.

    POST /v1/chat/completions answers; GET /stats returns counters; POST /control changes faults at run time
    (e.g. {"error_rate": 0.3} or {"storm": {"requests": 3, "retry_after_s": 2}})."""
    logs.configure(options.pop("log_level"), "auto")
    try:
        config = _config(options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    asyncio.run(_serve(config))


def _config(options: dict[str, Any]) -> StandinConfig:
    faults = Faults(
        error_rate=options["error_rate"],
        timeout_rate=options["timeout_rate"],
        malformed_rate=options["malformed_rate"],
        out_of_set_rate=options["out_of_set_rate"],
        latency_ms=options["latency_ms"],
        hang_s=options["hang_s"],
        rpm=options["rpm"],
        tpm=options["tpm"],
    )
    if options["hard_accuracy"] is not None and options["policy"] != "oracle":
        raise ValueError("--hard-accuracy only applies to --policy oracle")
    return StandinConfig(
        host=options["host"],
        port=options["port"],
        policy=options["policy"],
        labels=options["labels"],
        accuracy=options["accuracy"],
        hard_accuracy=options["hard_accuracy"],
        seed=options["seed"],
        faults=faults,
    )


async def _serve(config: StandinConfig) -> None:
    stop = asyncio.Event()
    with signal_handlers(lambda _sig: stop.set()):
        async with StandinServer(config) as url:
            click.echo(url, err=True)
            await stop.wait()
