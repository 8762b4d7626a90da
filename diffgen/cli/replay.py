"""``diffgen replay``: re-draw a traced run without a model, or export a picture of it."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffgen.cli.support.common import check_output_path
from diffgen.cli.support.funnel import doing
from diffgen.cli.support.options import NoColorOption
from diffgen.outputs import same_file

EPILOG = (
    "Examples:\n\n"
    '  diffgen run --trace run.jsonl "Why is the sky blue?"\n\n'
    "  diffgen replay run.jsonl --speed 0.25          (four times slower than it ran)\n\n"
    "  diffgen replay run.jsonl --svg run.svg --html run.html"
)


def replay(
    file: Annotated[Path, typer.Argument(help="A trace written by `diffgen run --trace` (or fill, edit).", dir_okay=False)],
    speed: Annotated[float, typer.Option("--speed", min=0, help="Playback speed; 0 plays without pauses.")] = 1.0,
    svg: Annotated[
        Optional[Path], typer.Option("--svg", dir_okay=False, help="Write a picture of the run as SVG instead.")
    ] = None,
    html: Annotated[
        Optional[Path], typer.Option("--html", dir_okay=False, help="Write a picture of the run as HTML instead.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing --svg/--html files even if diffgen did not write them "
                                               "(the trace itself is never replaced).")
    ] = False,
    no_color: NoColorOption = False,
) -> None:
    """Re-draw a traced run without a model, or export a picture of when each token settled."""
    from diffgen.records import trace
    from diffgen.ui import render
    from diffgen.ui import view

    from diffgen.errors import UsageError

    if svg is not None and html is not None and same_file(svg, html):
        raise UsageError(f"--svg and --html name the same file ({svg})", "give each picture its own file")
    check_output_path(svg, "--svg", inputs=(file,), overwrite=overwrite, ours=picture_of("<svg"),
                      kind="a picture diffgen wrote")
    check_output_path(html, "--html", inputs=(file,), overwrite=overwrite, ours=picture_of("<!DOCTYPE html>"),
                      kind="a picture diffgen wrote")
    recorded = trace.read_trace(file)
    if svg is not None or html is not None:
        from diffgen.ui import picture

        with doing("writing the picture"):
            for path in picture.export(recorded, svg=svg, html=html):
                typer.echo(f"wrote {path}", err=True)
        return
    console = render.error_console()
    with doing("replaying the trace"), view.step_view(console, recorded.channel_ids, sys.stderr) as shown:
        clock = 0.0
        for record in recorded.records:
            if speed > 0:
                time.sleep(min(max(record.elapsed - clock, 0.0) / speed, 2.0))
            clock = record.elapsed
            shown.update(record)
    if recorded.result is not None:
        sys.stdout.write(recorded.result["text"] + "\n")
        sys.stdout.flush()


def picture_of(start: str):
    """Whether an existing file is a picture ``replay`` wrote (it starts with ``start`` and names
    diffgen): one that --svg / --html may replace."""

    def ours(path: Path) -> bool:
        from diffgen.outputs import head
        from diffgen.ui.picture import MARK

        text = head(path, 1 << 20).decode("utf-8", "replace")
        return text.lstrip().startswith(start) and MARK in text

    return ours
