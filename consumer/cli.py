"""The ``shunt`` command. Each subcommand lives in ``consumer/commands/<name>.py`` as ``command`` and is
imported only when it runs, so ``shunt --help`` stays fast and one command's heavy imports never slow another."""

from __future__ import annotations

import importlib
import sys

import click

from consumer import __version__
from consumer.errors import ExitCode, FatalError, ShuntError

# name -> (module, one-line help shown by ``shunt --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("consumer.commands.run", "Run the service: consume reviews, label them, publish."),
    "batch": ("consumer.commands.batch", "Run the batch lane alone: deferred reviews through the Batch API."),
    "score": ("consumer.commands.score", "Score text or a JSONL file with the small model."),
    "train": ("consumer.commands.train", "Train and calibrate the default small model."),
    "distill": ("consumer.commands.distill", "Retrain the small model from LLM answers (L4S)."),
    "eval": ("consumer.commands.evaluate", "Offline evaluation and threshold choice."),
    "llm-standin": ("consumer.commands.llm_standin", "Run the stand-in OpenAI-compatible LLM server."),
    "demo": ("consumer.commands.demo", "The whole thing on an embedded broker, with a summary."),
    "top": ("consumer.commands.top", "A live view of the metrics topic."),
    "report": ("consumer.commands.report", "A one-shot summary of the metrics topic."),
    "config": ("consumer.commands.config", "Show the effective configuration."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, short_help = COMMANDS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return _not_built(cmd_name, short_help)
        command: click.Command = module.command
        command.short_help = short_help
        return command


def _not_built(name: str, short_help: str) -> click.Command:
    @click.command(
        name=name, short_help=short_help + " (not built yet)", context_settings={"ignore_unknown_options": True}
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args: tuple[str, ...]) -> None:
        raise click.ClickException(f"'shunt {name}' is not built yet")

    return stub


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shunt")
def cli() -> None:
    """Data Shunt: a small model labels what it is sure of; only the uncertain rest goes to the LLM."""


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FatalError as exc:
        click.echo(f"fatal: {exc}", err=True)
        sys.exit(ExitCode.FATAL)
    except ShuntError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.REFUSED)
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)
