"""``diffgen completion SHELL``: print the shell completion script."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

EPILOG = (
    "Examples:\n\n"
    "  diffgen completion bash > ~/.local/share/bash-completion/completions/diffgen\n\n"
    "  diffgen completion zsh > ~/.zfunc/_diffgen\n\n"
    "  diffgen completion fish > ~/.config/fish/completions/diffgen.fish"
)


def completion(shell: Annotated[str, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the completion script for SHELL (commands, options, and --model from the Hugging Face cache)."""
    from diffgen.docs import SHELLS, completion_script

    if shell not in SHELLS:
        raise typer.BadParameter(f"use one of {', '.join(SHELLS)}", param_hint="SHELL")
    sys.stdout.write(completion_script(shell))
