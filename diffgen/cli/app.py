"""The ``diffgen`` command line: a thin dispatcher over one module per command.

Each command (:mod:`diffgen.commands`) parses its options, builds settings, calls the library
and hands the result to a renderer. Heavy imports (torch, transformers) happen inside the
commands, so ``--help``, ``--version`` and completion stay instant.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from diffgen import __version__
from diffgen.cli import batch
from diffgen.cli import bench
from diffgen.cli import completion
from diffgen.cli import info
from diffgen.cli import pull
from diffgen.cli import replay
from diffgen.cli import run
from diffgen.cli.common import error_funnel
from diffgen.errors import EXIT_INTERRUPTED

app = typer.Typer(
    name="diffgen",
    help="Run DiffusionGemma text-diffusion models locally.",
    epilog=(
        "Examples:\n\n"
        '  diffgen run "Why is the sky blue?"\n\n'
        '  cat notes.md | diffgen run "Summarise this"\n\n'
        "  diffgen run --json --seed 7 -m ./my-checkpoint \"Write a haiku\"\n\n"
        "  diffgen batch prompts.txt -o answers.jsonl\n\n"
        "Set DIFFGEN_DEBUG=1 to see tracebacks."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(epilog=run.EPILOG)(run.run)
app.command(epilog=batch.EPILOG)(batch.batch)
app.command(epilog=replay.EPILOG)(replay.replay)
app.command(epilog=info.EPILOG)(info.info)
app.command(epilog=pull.EPILOG)(pull.pull)
app.command(epilog=bench.EPILOG)(bench.bench)
app.command(epilog=completion.EPILOG)(completion.completion)


def versions() -> str:
    """``diffgen X, torch Y, transformers Z`` from package metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"diffgen {__version__}"]
    for package in ("torch", "transformers"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} (not installed)")
    return ", ".join(parts)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(versions())
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True,
                     help="Print the versions of diffgen, torch and transformers, then exit."),
    ] = False,
    no_color: Annotated[bool, typer.Option("--no-color", help="No colours on stderr (like NO_COLOR=1).")] = False,
) -> None:
    """Run DiffusionGemma text-diffusion models locally."""
    import os

    if no_color:
        os.environ["NO_COLOR"] = "1"
    if ctx.resilient_parsing:  # shell completion: stay fast and quiet
        return
    with error_funnel():
        _apply_config(ctx)


def _apply_config(ctx: typer.Context) -> None:
    """Defaults from the config file become click's default_map (flags > env > file > built-in)."""
    from diffgen.cli import config

    data = config.read()
    if not data:
        return
    commands = {name: config.option_keys(command.params) for name, command in ctx.command.commands.items()}
    defaults, unknown = config.default_map(data, commands)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    for key in unknown:
        typer.echo(f"diffgen: warning: {config.config_path()}: {key!r} is not an option of any command", err=True)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C before a command's own funnel took over
        typer.echo("diffgen: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
