"""``diffgen fill``: a template's holes filled, conditioned on the text before and after them."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from diffgen.cli.support.common import check_trace_path, denoise_laid_out, encode_with_images, exclusive, read_images
from diffgen.cli.support.funnel import doing
from diffgen.cli.support.job import LocalJob, answer_out
from diffgen.cli.support.option_groups import Runtime, Sampler, grouped
from diffgen.cli.support.options import (
    DEFAULT_MODEL,
    ClampedShowStepsOption,
    ClampedTraceOption,
    ImageOption,
    ModelOption,
    NoColorOption,
    OverwriteOption,
    QuietOption,
    RawOption,
    SeedOption,
    SystemOption,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from diffgen.denoise.constrained.fill import Template
    from diffgen.loading.prepare import Prepared

EPILOG = (
    "Examples:\n\n"
    "  diffgen fill $'def {{4}}(xs):\\n    return sorted(xs, key={{8}})'\n\n"
    "  diffgen fill -p \"A polite reply\" 'Dear {{4}}, thanks for {{}}. Best, Ana'\n\n"
    "  cat letter.tmpl | diffgen fill --json - | jq '.holes[].text'\n\n"
    "  diffgen fill --trace fill.jsonl 'Dear {{4}},' && diffgen replay fill.jsonl   (template text shown as fixed)\n\n"
    "  diffgen fill --image chart.png -p 'Read the chart' 'Peak: {{4}} in {{4}}'   (the prompt shows the image)\n\n"
    "A hole is {{}} (16 tokens) or {{N}} (N tokens). Every other token of the template is clamped at "
    "every denoising step (the model has no mask token, so text is pinned, not seeded); each hole is "
    "denoised conditioned on the text on both sides. A hole may come back shorter than N tokens (the "
    "model ends it with an EOS or pad), never longer. Templates longer than one canvas run over several. "
    "stdout is the template with its holes filled; its fixed text is printed byte for byte as given."
)


@grouped
def fill(
    ctx: typer.Context,
    template: Annotated[
        Optional[str],
        typer.Argument(help="The template, with {{}} or {{N}} holes. Omit it or pass - to read it from stdin.",
                       show_default=False),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    prompt: Annotated[
        Optional[str],
        typer.Option("--prompt", "-p", show_default="none",
                     help="Instructions the model reads before the template (through the chat template unless "
                          "--raw)."),
    ] = None,
    image: ImageOption = None,
    system: SystemOption = None,
    raw: RawOption = False,
    sampler: Sampler = Sampler(),
    seed: SeedOption = None,
    runtime: Runtime = Runtime(),
    quiet: QuietOption = False,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object on stdout: the filled text and each hole's text, token "
                                    "span and mean entropy (a confidence: lower is surer)."),
    ] = False,
    show_steps: ClampedShowStepsOption = False,
    trace_file: ClampedTraceOption = None,
    overwrite: OverwriteOption = False,
    no_color: NoColorOption = False,
) -> None:
    """Fill the holes of TEMPLATE (or stdin) and print the filled template on stdout."""
    from diffgen.denoise.constrained import fill as fill_mod

    # Every flag and the template are checked before anything is read from the checkpoint.
    raw, system = exclusive(ctx, "a system prompt needs the chat template; drop --raw", raw=raw, system=system)
    job = LocalJob(ctx, model, runtime, quiet=quiet)
    check_trace_path(trace_file, inputs=(image,), overwrite=overwrite)
    if image and raw:
        from diffgen.errors import UsageError

        raise UsageError("--image does not combine with --raw: the chat template places the images",
                         "drop --raw or --image")
    pictures, _ = read_images(image, template, what="the template")
    parsed = _read_template(template, quiet=quiet)

    prepared = job.prepare(seed=seed, flags=sampler.flags(), images=len(pictures))
    with job.tokenizing() as tokenizer:
        prefix = _prefix(tokenizer, prepared, prompt, system=system, raw=raw)
        plan = fill_mod.layout(parsed, tokenizer, job.canvas_length, prepared.settings.pad_token_id)
    settings = fill_mod.fill_settings(prepared.settings, plan)
    vision = None
    if pictures:  # the images go into a user turn before the prompt's text, as with run --image
        prefix, vision = encode_with_images(prepared, tokenizer, prompt or "", pictures, system=system, think=False,
                                            settings=settings)
    job.check_context(len(prefix), settings, refusal=lambda: (
        f"the prompt ({len(prefix)} tokens) plus the template ({plan.length} tokens, {len(plan.tokens)} "
        f"positions in whole canvases) do not fit the model's context",
        "shorten the template, its holes or the prompt"))
    loaded = job.load()
    result, trace_failure = denoise_laid_out(
        job.console, tokenizer,
        lambda on_event: fill_mod.fill(loaded, prefix, parsed, settings, execution=job.execution,
                                       on_event=on_event, vision=vision),
        phase="filling the template", show_steps=show_steps, trace_file=trace_file, model=model,
        prompt=prompt or "", settings=settings, canvas_length=job.canvas_length, quiet=quiet)

    def write() -> None:
        from diffgen.ui import render

        if json_output:
            render.write_json(fill_record(result, model=model), sys.stdout)
        else:
            sys.stdout.write(result.text + "\n")
            sys.stdout.flush()

    answer_out(write, trace_failure)


def _read_template(template: Optional[str], *, quiet: bool) -> Template:
    """The template (from stdin for none or ``-``), parsed into text and holes."""
    from diffgen import prompt as prompt_mod
    from diffgen.denoise.constrained.fill import parse_template

    with doing("reading the template"):
        if template is None or template == "-":
            data = prompt_mod.read_stdin(sys.stdin)
            if not data:
                from diffgen.errors import UsageError

                raise UsageError("no template: give one as an argument or on stdin",
                                 "e.g. diffgen fill 'Dear {{4}}, thanks for {{}}.'")
            text, warning = prompt_mod.decode_input(data, "stdin")
            if warning and not quiet:
                typer.echo(f"diffgen: warning: {warning}", err=True)
            text = text[:-1] if text.endswith("\n") else text
        else:
            text = template
        return parse_template(text)


def _prefix(tokenizer: PreTrainedTokenizerBase, prepared: Prepared, prompt: Optional[str], *, system: Optional[str],
            raw: bool) -> list[int]:
    """The tokens before the template: the prompt through the chat template, or only the
    tokenizer's own start (or a pad) when there is neither a prompt nor a system prompt."""
    from diffgen import prompt as prompt_mod

    if prompt is None and not system:
        return list(tokenizer("", add_special_tokens=True)["input_ids"]) or [prepared.settings.pad_token_id]
    return prompt_mod.encode(tokenizer, prompt or "", system=system, raw=raw)


def fill_record(result, *, model: str) -> dict:
    """The ``--json`` object of a filled template."""
    return {
        "text": result.text,
        "holes": [{"text": hole.text, "start": hole.start, "end": hole.end, "tokens": list(hole.token_ids),
                   "mean_entropy": hole.mean_entropy} for hole in result.holes],
        "model": model,
        "seed": result.settings.seed,
        "prompt_tokens": result.prompt_tokens,
        "template_tokens": result.layout.length,
        "steps_per_canvas": list(result.steps_per_canvas),
        "seconds": result.seconds,
        "settings": result.settings.to_dict(),
    }
