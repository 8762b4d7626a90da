"""The config file: defaults for any command's options.

``$XDG_CONFIG_HOME/diffgen/config.toml`` (``~/.config/diffgen/config.toml``; ``DIFFGEN_CONFIG``
names another file). Top-level keys apply to every command that has that option; a
``[run]``, ``[batch]``, ... table applies to one command and wins over the top level::

    model = "google/diffusiongemma-26B-A4B-it"
    quant = "nf4"
    think = true

    [batch]
    batch-size = "16"

Keys are option names without the dashes (``max-new-tokens`` or ``max_new_tokens``).
Precedence: command-line flags > environment variables > this file > built-in defaults
(click's ``default_map`` sits exactly between the environment and the defaults).

A broken file never locks the user out: unreadable TOML is a warning (naming the file) and
the file is ignored, so ``--help``, ``info`` and ``completion`` keep working; a bad value is
reported when a command uses it, naming the file and the key (see :mod:`diffgen.cli.support.funnel`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


PRECEDENCE = "flags > environment (DIFFGEN_MODEL, ...) > config file > built-in defaults"


def config_path() -> Path:
    explicit = os.environ.get("DIFFGEN_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "diffgen" / "config.toml"


def read_or_warn(path: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """``(data, problem)``: the parsed file (``{}`` when absent or unreadable) and, when it could
    not be read, one line saying why (the caller warns and goes on without it)."""
    path = path or config_path()
    if not path.is_file():
        if os.environ.get("DIFFGEN_CONFIG") and path == config_path():
            # Named on purpose: a file that is not there is a mistake to hear about.
            what = "a directory" if path.is_dir() else "not a file" if path.exists() else "missing"
            return {}, f"DIFFGEN_CONFIG names {path}, which is {what}"
        return {}, None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        return {}, f"cannot read the config file {path}: {exc}"


def default_map(data: dict[str, Any], commands: dict[str, dict[str, str]]
                ) -> tuple[dict[str, dict[str, Any]], list[str], dict[tuple[str, str], str]]:
    """Click default maps per command, the keys that matched no option, and where each default
    came from (``{(command, parameter): "key"}`` or ``"[command] key"``, for error messages).

    ``commands`` maps each command to ``{option key: parameter name}`` (both spellings).
    """
    out: dict[str, dict[str, Any]] = {name: {} for name in commands}
    sources: dict[tuple[str, str], str] = {}
    used: set[str] = set()
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for command, keys in commands.items():
        for key, value in top.items():
            if key in keys:
                out[command][keys[key]] = value
                sources[(command, keys[key])] = key
                used.add(key)
        for key, value in (data.get(command) or {}).items():
            if key in keys:
                out[command][keys[key]] = value
                sources[(command, keys[key])] = f"[{command}] {key}"
                used.add(f"{command}.{key}")
    unknown = [k for k in top if k not in used]
    unknown += [f"{c}.{k}" for c, table in data.items() if isinstance(table, dict)
                for k in table if f"{c}.{k}" not in used]
    return {c: m for c, m in out.items() if m}, unknown, sources


def option_keys(params: list[Any]) -> dict[str, str]:
    """``{"max-new-tokens": "max_new_tokens", "max_new_tokens": ...}`` for click parameters."""
    keys = {}
    for param in params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                keys[opt[2:]] = param.name
                keys[opt[2:].replace("-", "_")] = param.name
    return keys
