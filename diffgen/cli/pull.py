"""``diffgen pull``: download a checkpoint into the Hugging Face cache."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from diffgen.cli.support.funnel import error_funnel
from diffgen.cli.support.options import NoColorOption, OfflineOption, not_blank

EPILOG = (
    "Examples:\n\n"
    "  diffgen pull google/diffusiongemma-26B-A4B-it\n\n"
    "  HF_HOME=/data/hf diffgen pull google/diffusiongemma-26B-A4B-it\n\n"
    "  diffgen pull nvidia/diffusiongemma-26B-A4B-it-NVFP4      (the 19 GB NVFP4 checkpoint, for 24-32 GB cards)\n\n"
    "Only configs, the tokenizer, the chat template and then the safetensors shards the index names are "
    "fetched, never pickled weights or unused copies. An interrupted pull resumes where it stopped. The "
    "snapshot's path is printed on stdout."
)


def pull(
    model: Annotated[str, typer.Argument(help="Hub id, e.g. google/diffusiongemma-26B-A4B-it.", callback=not_blank)],
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Branch, tag or commit.", show_default="main")
    ] = None,
    offline: OfflineOption = False,
    no_color: NoColorOption = False,
) -> None:
    """Download MODEL into the Hugging Face cache (resumable), with a progress bar on stderr."""
    with error_funnel("interrupted; run the same pull again to resume", what=f"downloading {model}"):
        from diffgen.loading import hub

        path = hub.pull(model, offline=offline, revision=revision)
        sys.stdout.write(f"{path}\n")
