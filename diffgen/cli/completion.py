"""``diffgen completion SHELL``: print the shell completion script."""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import typer

from diffgen.cli.support.options import NoColorOption

SHELLS = {"bash": "diffgen.bash", "zsh": "diffgen.zsh", "fish": "diffgen.fish"}
COMPLETE_VAR = "_DIFFGEN_COMPLETE"

EPILOG = (
    "Examples:\n\n"
    "  diffgen completion bash > ~/.local/share/bash-completion/completions/diffgen\n\n"
    "  diffgen completion zsh > ~/.zfunc/_diffgen\n\n"
    "  diffgen completion fish > ~/.config/fish/completions/diffgen.fish"
)


def completion(
    shell: Annotated[Literal["bash", "zsh", "fish"], typer.Argument(help="The shell to complete in.")],
    no_color: NoColorOption = False,
) -> None:
    """Print the completion script for SHELL (commands, options, and --model from the Hugging Face cache)."""
    sys.stdout.write(completion_script(shell))


def completion_script(shell: str) -> str:
    """Typer's completion script for ``shell``; it calls back into ``diffgen`` with ``_DIFFGEN_COMPLETE`` set."""
    from typer.completion import get_completion_script

    return get_completion_script(prog_name="diffgen", complete_var=COMPLETE_VAR, shell=shell).rstrip("\n") + "\n"
