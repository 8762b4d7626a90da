"""``diffgen edit``: marked spans of a file revised in place, everything else kept byte for byte."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from diffgen.cli.support.common import check_trace_path, denoise_laid_out, exclusive
from diffgen.cli.support.funnel import doing
from diffgen.cli.support.job import LocalJob, answer_out
from diffgen.cli.support.option_groups import Runtime, Sampler, grouped
from diffgen.cli.support.options import (
    DEFAULT_MODEL,
    ClampedShowStepsOption,
    ClampedTraceOption,
    ModelOption,
    NoColorOption,
    OverwriteOption,
    QuietOption,
    RawOption,
    SeedOption,
    SystemOption,
)

if TYPE_CHECKING:
    from diffgen.denoise.constrained.edit import Document

EPILOG = (
    "Examples:\n\n"
    "  diffgen edit notes.md \"Make it formal\"            (spans marked {{~old text~}} in notes.md)\n\n"
    "  diffgen edit --lines 3-5 --lines 9 app.py \"Use pathlib\" --diff | patch -p1\n\n"
    "  diffgen edit --trace edit.jsonl notes.md \"Shorter\" && diffgen replay edit.jsonl --svg edit.svg\n\n"
    "Mark each span to revise in the file as {{~old text~}}, or give line ranges with --lines (the file is "
    "then taken literally). Every token outside the spans is clamped at every denoising step; each span's "
    "positions start from its old text's tokens instead of noise, and the sampler renoises them as it "
    "goes. A span of n old tokens may use n + max(8, n/2) positions: the revision may be that much longer, "
    "or shorter (unused positions become pad and are dropped). stdout is the revised file (the text outside "
    "the spans byte for byte as given), or with --diff a unified diff of the file (markers removed) against it."
)


@grouped
def edit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The file to revise, with spans marked {{~old text~}} (or --lines).",
                                         dir_okay=False, show_default=False)],
    instruction: Annotated[str, typer.Argument(help="What to do to the spans (through the chat template unless "
                                                    "--raw).", show_default=False)],
    lines: Annotated[
        Optional[list[str]],
        typer.Option("--lines", "-l", show_default=False,
                     help="Revise these lines (N or A-B, 1-based, inclusive; repeatable) instead of marked spans; "
                          "the file is taken literally."),
    ] = None,
    diff: Annotated[bool, typer.Option("--diff", help="Print a unified diff instead of the revised file.")] = False,
    model: ModelOption = DEFAULT_MODEL,
    system: SystemOption = None,
    raw: RawOption = False,
    sampler: Sampler = Sampler(),
    seed: SeedOption = None,
    runtime: Runtime = Runtime(),
    quiet: QuietOption = False,
    show_steps: ClampedShowStepsOption = False,
    trace_file: ClampedTraceOption = None,
    overwrite: OverwriteOption = False,
    no_color: NoColorOption = False,
) -> None:
    """Revise the marked spans of FILE as INSTRUCTION says; print the revised file (or a diff) on stdout."""
    from diffgen import prompt as prompt_mod
    from diffgen.denoise.constrained import edit as edit_mod
    from diffgen.denoise.constrained import fill as fill_mod

    # Every flag and the file are checked before anything is read from the checkpoint.
    raw, system = exclusive(ctx, "a system prompt needs the chat template; drop --raw", raw=raw, system=system)
    job = LocalJob(ctx, model, runtime, quiet=quiet)
    check_trace_path(trace_file, inputs=(file,), overwrite=overwrite)
    document = _read_document(file, lines)

    prepared = job.prepare(seed=seed, flags=sampler.flags())
    with job.tokenizing() as tokenizer:
        prefix = prompt_mod.encode(tokenizer, instruction, system=system, raw=raw)
        plan, _, _ = edit_mod.edit_layout(document, tokenizer, job.canvas_length, prepared.settings.pad_token_id)
    settings = fill_mod.fill_settings(prepared.settings, plan)
    job.check_context(len(prefix), settings, refusal=lambda: (
        f"the instruction ({len(prefix)} tokens) plus the file ({plan.length} tokens with the spans' room to "
        f"grow, {len(plan.tokens)} positions in whole canvases) do not fit the model's context",
        "revise a shorter file or mark fewer spans"))
    loaded = job.load()
    result, trace_failure = denoise_laid_out(
        job.console, tokenizer,
        lambda on_event: edit_mod.edit(loaded, prefix, document, settings, execution=job.execution,
                                       on_event=on_event),
        phase="revising the file", show_steps=show_steps, trace_file=trace_file, model=model,
        prompt=instruction, settings=settings, canvas_length=job.canvas_length, quiet=quiet)

    def write() -> None:
        if diff:
            sys.stdout.write(edit_mod.unified_diff(result.original, result.text, Path(file).name))
        else:
            sys.stdout.write(result.text)
        sys.stdout.flush()

    answer_out(write, trace_failure)


def _read_document(file: Path, lines: Optional[list[str]]) -> Document:
    """The file's text, split into the spans to revise and the text kept byte for byte."""
    from diffgen import prompt as prompt_mod
    from diffgen.denoise.constrained import edit as edit_mod
    from diffgen.errors import UsageError

    with doing("reading the file"):
        data = prompt_mod.read_file(file, "the file")
        try:
            # Everything outside the spans is printed byte for byte, so bytes that are not UTF-8
            # cannot go through text: refuse them rather than turn them into U+FFFD.
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{file} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}), and edit keeps "
                             "every byte outside the spans exactly", "convert it first, e.g. iconv -f latin1 -t utf-8"
                             ) from exc
        return edit_mod.parse_lines(text, lines) if lines else edit_mod.parse_marked(text)
