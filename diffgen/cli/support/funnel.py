"""The one error funnel: whatever goes wrong becomes one line on stderr and an exit code.

* :class:`~diffgen.errors.DiffgenError` -> its message and hint; exit 1 (2 for usage errors).
* Ctrl-C -> ``diffgen: interrupted`` (or the command's own words); exit 130.
* A closed stdout (``diffgen run ... | head -1``) -> silence; exit 0.
* Typer/click usage errors (a bad number, an unknown option) -> ``diffgen: error: ...``; exit 2.
  A value that came from the config file names the file and the key instead of a flag.
* An OSError that is the machine's condition (a full disk, a read-only file system, ...) ->
  one line naming what was being done, the file and what to do; exit 1.
* Anything else -> one line naming what was being done, the exception type and its message,
  and how to see the traceback; exit 1.

``DIFFGEN_DEBUG=1`` lets every exception through with its traceback (usage errors excepted:
they have none worth seeing). The funnel wraps every command (the app's group invokes each
command inside it) and :func:`diffgen.cli.app.main` wraps the whole app, so nothing escapes.
Commands name their phases with :func:`doing`, so an unexpected failure says where it happened.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

import typer

from diffgen.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, DiffgenError

DEBUG_HINT = "set DIFFGEN_DEBUG=1 for the traceback"
_DOING = "_diffgen_doing"  # attribute an exception carries: what was being done when it was raised
_INTERRUPTED = "_diffgen_interrupted"  # attribute a KeyboardInterrupt carries: the command's own words
CONFIG_KEYS = "diffgen.config"  # ctx.meta entry: (config path, {(command, parameter): "key as written"})


def debug() -> bool:
    return os.environ.get("DIFFGEN_DEBUG", "").strip() not in {"", "0"}


def _tag(exc: BaseException, attribute: str, value: str) -> None:
    if getattr(exc, attribute, None) is None:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(exc, attribute, value)


@contextlib.contextmanager
def doing(what: str) -> Iterator[None]:
    """Name the work inside (``"loading the weights"``) for the line an unexpected error becomes.

    The innermost name wins; known errors keep their own message.
    """
    try:
        yield
    except BaseException as exc:
        _tag(exc, _DOING, what)
        raise


@contextlib.contextmanager
def error_funnel(interrupted: str = "interrupted",
                 what: Union[str, Callable[[], str], None] = None) -> Iterator[None]:
    """Run the body inside the funnel; what goes wrong becomes one line and ``typer.Exit(code)``.

    ``interrupted`` is what Ctrl-C says (e.g. how to resume); ``what`` names the work for
    unexpected errors that no inner :func:`doing` named (a function is called only then).
    """
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            _tag(exc, _INTERRUPTED, interrupted)
        code = report(exc, doing=what or "running diffgen")
        if code is None:
            raise
        raise typer.Exit(code) from None


def report(exc: BaseException, doing: Union[str, Callable[[], str]] = "running diffgen") -> Optional[int]:
    """Print the one line for ``exc`` on stderr and return its exit code.

    ``None`` means "not ours, let it through": exits, click's own exceptions (the app renders
    those, see :func:`usage_error`), and everything under ``DIFFGEN_DEBUG=1``.
    """
    if isinstance(exc, (SystemExit, typer.Exit, GeneratorExit)) or is_click_exception(exc):
        return None
    if isinstance(exc, BrokenPipeError):
        # stdout was closed early (e.g. `diffgen run ... | head -1`): not an error. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    if debug():
        return None
    if isinstance(exc, KeyboardInterrupt):
        _say(f"diffgen: {getattr(exc, _INTERRUPTED, None) or 'interrupted'}")
        return EXIT_INTERRUPTED
    if isinstance(exc, DiffgenError):
        hint = exc.hint or ""
        if exc.retry and _ARGV is not None:
            hint = (f"{hint}: " if hint else "run ") + retried(_ARGV, exc.retry)
        _say(f"diffgen: error: {exc.message}" + (f" — {hint}" if hint else ""))
        return exc.exit_code
    if not isinstance(exc, Exception):
        return None
    what = getattr(exc, _DOING, None) or (doing() if callable(doing) else doing)
    if isinstance(exc, OSError) and exc.errno in _environmental():
        # The machine's condition (a full disk, a read-only mount, a vanished file), not a bug.
        from diffgen.outputs import advice

        where = f" {exc.filename}" if exc.filename else ""
        _say(f"diffgen: error: {what}:{where} {exc.strerror or exc} — {advice(exc)}")
        _settle_stdout()
        return EXIT_ERROR
    message = _first_line(str(exc))
    detail = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    _say(f"diffgen: error: {what}: {detail} — this is a bug or an unexpected condition; {DEBUG_HINT}")
    return EXIT_ERROR


def _environmental() -> frozenset:
    from diffgen.outputs import ENVIRONMENTAL

    return ENVIRONMENTAL


def _settle_stdout() -> None:
    """After a failed write, flush what stdout still holds; if that fails too (the disk is full),
    point it at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the process is ending


_ARGV: Optional[list[str]] = None  # the arguments of this invocation, for error hints that retry it


def remember_argv(args: list[str]) -> None:
    """Keep the command line the user gave, so that an error can show it corrected."""
    global _ARGV
    _ARGV = list(args)


def retried(argv: list[str], changes: Any) -> str:
    """The command ``diffgen ARGV`` with ``changes`` applied, quoted for a POSIX shell.

    ``changes``: ``(flag, value)`` pairs; a string sets a flag that takes a value, ``None`` adds an
    on/off flag, ``False`` removes one. A changed flag keeps its place; a new one goes right
    after the command name.
    """
    import shlex

    words = list(argv)
    end = words.index("--") if "--" in words else len(words)
    head, tail = words[:end], words[end:]
    for flag, value in changes:
        at = None
        kept: list[str] = []
        skip = False
        for word in head:
            if skip:
                skip = False
            elif word == flag or word.startswith(flag + "="):
                at = len(kept) if at is None else at
                skip = word == flag and isinstance(value, str)  # its value follows it
            else:
                kept.append(word)
        head = kept
        if value is not False:
            if at is None:
                at = next((i + 1 for i, word in enumerate(head) if not word.startswith("-")), len(head))
            head[at:at] = [flag] if value is None else [flag, value]
    return "diffgen " + shlex.join(head + tail)


def _first_line(text: str, limit: int = 300) -> str:
    line = next((part.strip() for part in text.strip().splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        typer.echo(line, err=True)


# -- click's own errors (typer >= 0.26 vendors click: reach its classes through the public API) ----

_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def is_click_exception(exc: BaseException) -> bool:
    return isinstance(exc, (_CLICK_EXCEPTION, typer.Abort))


def usage_error(exc: BaseException) -> int:
    """Print click's usage error (or other click exception) as one ``diffgen: error:`` line; its code."""
    if isinstance(exc, typer.Abort):
        _say("diffgen: interrupted")
        return EXIT_INTERRUPTED
    if type(exc).__name__ == "NoArgsIsHelpError":  # bare `diffgen`: the help is the answer
        exc.show()  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    ctx = getattr(exc, "ctx", None)
    param = getattr(exc, "param", None)
    raw = getattr(exc, "message", None) or str(exc)
    raw = raw[len("Value error, "):] if raw.lower().startswith("value error, ") else raw
    from_config = _config_source(ctx, param)
    if from_config is not None:
        path, key, value = from_config
        _say(f"diffgen: error: config file {path}: {key} = {value!r}: {_lower(raw)} — fix or remove it "
             f"(a flag on the command line overrides it)")
        return EXIT_USAGE
    given = _given(param)
    if given is not None and type(exc).__name__ == "BadParameter":
        flag, value = given
        message = f"invalid value {value!r} for {flag}: {_lower(raw)}"
    else:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = _lower(" ".join(message.split()).rstrip("."))
    line = f"diffgen: error: {message}"
    if ctx is not None and getattr(ctx, "command_path", None):
        line += f" — see `{_display_path(ctx.command_path)} --help`"
    _say(line)
    return int(getattr(exc, "exit_code", EXIT_USAGE))


def _given(param: Any) -> Optional[tuple[str, str]]:
    """``(flag, value)`` as the user typed them for an option, from this invocation's arguments."""
    opts = [*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())]
    if _ARGV is None or getattr(param, "param_type_name", None) != "option" or getattr(param, "is_flag", False):
        return None
    words = _ARGV[: _ARGV.index("--")] if "--" in _ARGV else _ARGV
    found = None
    for index, word in enumerate(words):  # the last occurrence is the one click kept
        for opt in opts:
            if word == opt and index + 1 < len(words):
                found = (opt, words[index + 1])
            elif opt.startswith("--") and word.startswith(opt + "="):
                found = (opt, word[len(opt) + 1:])
    return found


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _display_path(command_path: str) -> str:
    """``python -m diffgen run`` -> ``diffgen run``."""
    words = command_path.split()
    return " ".join(["diffgen", *words[words.index("diffgen") + 1:]]) if "diffgen" in words else command_path


def _config_source(ctx: Any, param: Any) -> Optional[tuple[str, str, Any]]:
    """``(path, key, value)`` when ``param``'s bad value came from the config file, else ``None``."""
    if ctx is None or param is None or not getattr(param, "name", None):
        return None
    try:
        source = ctx.get_parameter_source(param.name)
    except Exception:  # noqa: BLE001 - no source recorded: not from the config file
        return None
    if getattr(source, "name", None) != "DEFAULT_MAP":
        return None
    path, keys = ctx.meta.get(CONFIG_KEYS, (None, {}))
    if path is None:
        return None
    key = keys.get((ctx.info_name, param.name), param.name)
    value = (ctx.default_map or {}).get(param.name)
    return str(path), key, value
