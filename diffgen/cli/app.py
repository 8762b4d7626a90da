"""The ``diffgen`` command line: a thin dispatcher over one module per command.

Each command (``diffgen/cli/<command>.py``) parses its options, builds settings, calls the
library and hands the result to a renderer. Heavy imports (torch, transformers) happen inside
the commands, so ``--help``, ``--version`` and completion stay instant.

Every command runs inside the one error funnel (:mod:`diffgen.cli.support.funnel`): :class:`DiffgenGroup`
invokes them inside it and renders click's own usage errors in the same one-line style, and
:func:`main` catches whatever could still escape.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from diffgen import __version__
from diffgen.cli import batch
from diffgen.cli import bench
from diffgen.cli import chat
from diffgen.cli import completion
from diffgen.cli import edit
from diffgen.cli import fill
from diffgen.cli.support import funnel
from diffgen.cli import info
from diffgen.cli import pull
from diffgen.cli import replay
from diffgen.cli import run
from diffgen.cli import serve
from diffgen.cli.support.options import NoColorOption


def _flags_take_no_value(params: list[Any]) -> list[Any]:
    """On/off flags show no ``<bool>`` type in the help, as if they took a value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class DiffgenCommand(TyperCommand):
    """A command whose help shows flags as flags, and whose text arguments are checked to be text."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        _check_text(ctx, self.params)
        return super().invoke(ctx)


#: Parameters that hold paths as strings: bytes that are not UTF-8 are a file name, not a mistake.
PATH_PARAMETERS = {"image", "input_path"}


def _check_text(ctx: Any, params: list[Any]) -> None:
    """A text argument or option holding bytes that are not UTF-8 (Python keeps them as lone
    surrogates) is a usage error naming it, before the command runs: a prompt, system text or
    instruction cannot be tokenised from them."""
    from diffgen.errors import UsageError

    for param in params:
        if param.name in PATH_PARAMETERS:
            continue
        value = ctx.params.get(param.name)
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if not isinstance(item, str):
                continue
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                name = (param.opts[0] if getattr(param, "param_type_name", "") == "option"
                        else param.name.upper())
                bad = item[exc.start].encode("utf-8", "surrogateescape")
                raise UsageError(f"{name} is not valid UTF-8 text (byte 0x{bad.hex()} at character {exc.start})",
                                 "pass UTF-8 text, e.g. convert it with iconv -t utf-8") from None


class DiffgenGroup(TyperGroup):
    """The app's group: every command runs inside the error funnel, and click's own usage errors
    (a bad number, an unknown option) come out as ``diffgen: error: ...`` with exit code 2."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        def what() -> str:
            return f"running `diffgen {ctx.invoked_subcommand}`" if ctx.invoked_subcommand else "running diffgen"

        with funnel.error_funnel(what=what):
            return super().invoke(ctx)

    def main(self, args: Optional[Any] = None, prog_name: Optional[str] = None, complete_var: Optional[str] = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        funnel.remember_argv(sys.argv[1:] if args is None else list(args))
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except BaseException as exc:
            if not funnel.is_click_exception(exc):
                code = funnel.report(exc, doing="reading the command line")
                if code is None or not standalone_mode:
                    raise
            elif not standalone_mode:
                raise
            else:
                code = funnel.usage_error(exc)
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    name="diffgen",
    cls=DiffgenGroup,
    help="Run DiffusionGemma text-diffusion models locally.",
    epilog=(
        "Examples:\n\n"
        '  diffgen run "Why is the sky blue?"\n\n'
        '  cat notes.md | diffgen run "Summarise this"\n\n'
        "  diffgen run --json --seed 7 -m ./my-checkpoint \"Write a haiku\"\n\n"
        "  diffgen batch prompts.txt -o answers.jsonl\n\n"
        "  diffgen serve   (an OpenAI-compatible server on http://127.0.0.1:8000/v1)\n\n"
        "  diffgen chat    (a multi-turn conversation; /help inside lists its commands)\n\n"
        "Set DIFFGEN_DEBUG=1 to see tracebacks."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for _module, _function in ((run, run.run), (chat, chat.chat), (fill, fill.fill), (edit, edit.edit), (batch, batch.batch),
                           (replay, replay.replay), (info, info.info), (pull, pull.pull), (bench, bench.bench),
                           (serve, serve.serve), (completion, completion.completion)):
    app.command(cls=DiffgenCommand, epilog=_module.EPILOG)(_function)


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
    no_color: NoColorOption = False,
) -> None:
    """Run DiffusionGemma text-diffusion models locally."""
    if ctx.resilient_parsing:  # shell completion: stay fast and quiet
        return
    with funnel.doing("reading the config file"):
        _apply_config(ctx)


def _apply_config(ctx: typer.Context) -> None:
    """Defaults from the config file become click's default_map (flags > env > file > built-in).

    A file that cannot be read is a warning, and diffgen goes on without it.
    """
    from diffgen.cli.support import config

    data, problem = config.read_or_warn()
    if problem is not None:
        typer.echo(f"diffgen: warning: {problem} — ignoring it; fix or remove it", err=True)
    if not data:
        return
    commands = {name: config.option_keys(command.params) for name, command in ctx.command.commands.items()}
    defaults, unknown, sources = config.default_map(data, commands)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[funnel.CONFIG_KEYS] = (config.config_path(), sources)
    for key in unknown:
        typer.echo(f"diffgen: warning: {config.config_path()}: {key!r} is not an option of any command", err=True)


def main() -> None:
    """The ``diffgen`` entry point: the app, and the funnel around it for anything that escapes."""
    try:
        app(prog_name="diffgen")
    except SystemExit:
        raise
    except BaseException as exc:
        code = funnel.report(exc, doing="starting diffgen")
        if code is None:
            raise
        sys.exit(code)
