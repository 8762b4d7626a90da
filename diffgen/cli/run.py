"""``diffgen run``: one prompt in, the answer on stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from diffgen.cli.support.common import check_trace_path, exclusive, parameter_source, read_images, refuse_local_only, status
from diffgen.cli.support.funnel import doing
from diffgen.cli.support.job import LocalJob, answer_out
from diffgen.cli.support.option_groups import Runtime, Sampler, grouped
from diffgen.cli.support.options import (
    DEFAULT_MODEL,
    ImageOption,
    MaxNewTokensOption,
    ModelOption,
    NoColorOption,
    NoStdinOption,
    OverwriteOption,
    QuietOption,
    RawOption,
    SeedOption,
    ServerOption,
    SystemOption,
    ThinkOption,
)
from diffgen.cli.support.run_backends import Ask, LocalRun, RemoteRun, Watch, write_answer

if TYPE_CHECKING:
    from diffgen.denoise.constrained.schema import SchemaResult

EPILOG = (
    "Examples:\n\n"
    '  diffgen run "Why is the sky blue?"\n\n'
    '  cat notes.md | diffgen run "Summarise this"      (stdin, a blank line, then the argument)\n\n'
    '  diffgen run -f a.py -f b.py "What differs?"      (each file under a "--- a.py ---" line)\n\n'
    '  diffgen run --think --stats "Is 1001 prime?"\n\n'
    '  diffgen run --show-steps --trace run.jsonl "Write a haiku"\n\n'
    '  diffgen run --json --seed 1 "Hello" | jq .text\n\n'
    '  diffgen run --image photo.png "What is in this picture?"   (needs pip install \'diffgen\\[images]\')\n\n'
    '  while read -r p; do diffgen run --no-stdin "$p"; done < prompts.txt   (a loop: keep stdin for read)\n\n'
    "A piped stdin is part of the prompt, so in a shell loop reading a file pass --no-stdin "
    "(or < /dev/null), or the first call swallows the rest of the file. "
    "Sampler defaults come from the checkpoint's generation_config.json. "
    "Generation runs in whole canvases (256 tokens for the released model); the answer is cut "
    "to --max-new-tokens."
)


@grouped
def run(
    ctx: typer.Context,
    prompt: Annotated[
        Optional[str],
        typer.Argument(help="The prompt. Omit it or pass - to read the prompt from stdin.", show_default=False),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    file: Annotated[
        Optional[list[Path]],
        typer.Option("--file", "-f", exists=True, dir_okay=False, readable=True, show_default=False, metavar="<file>",
                     help="Add a file's text before the prompt, under a '--- NAME ---' line (repeatable)."),
    ] = None,
    image: ImageOption = None,
    system: SystemOption = None,
    raw: RawOption = False,
    think: ThinkOption = False,
    max_new_tokens: MaxNewTokensOption = None,
    sampler: Sampler = Sampler(),
    seed: SeedOption = None,
    runtime: Runtime = Runtime(),
    no_stdin: NoStdinOption = False,
    quiet: QuietOption = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print one line of timing and step stats on stderr.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the text.")] = False,
    show_steps: Annotated[
        bool,
        typer.Option("--show-steps", help="Watch the denoising live on stderr (one plain line per step when stderr "
                                          "is not a terminal). stdout is unchanged."),
    ] = False,
    trace_file: Annotated[
        Optional[Path],
        typer.Option("--trace", dir_okay=False, show_default=False,
                     help="Write a JSONL trace of every step, for `diffgen replay`."),
    ] = None,
    overwrite: OverwriteOption = False,
    schema_file: Annotated[
        Optional[Path],
        typer.Option("--schema", exists=True, dir_okay=False, readable=True, show_default=False, metavar="<file>",
                     help="Answer with JSON that validates against this JSON Schema (a subset: objects with every "
                          "property required, strings with maxLength/enum, integers and numbers with "
                          "minimum/maximum, booleans, null, arrays with maxItems), valid by construction."),
    ] = None,
    retries: Annotated[
        int,
        typer.Option("--retries", min=0, max=10, metavar="<n>",
                     help="With --schema: resample up to N times the value slots that end unsure (mean entropy "
                          "above 1 nat), the rest clamped."),
    ] = 0,
    server: ServerOption = None,
    no_color: NoColorOption = False,
) -> None:
    """Generate an answer to PROMPT (and/or stdin) and print it on stdout."""
    # Every flag is checked before anything is read or loaded.
    raw, think = exclusive(ctx, "thinking mode needs the chat template; drop --raw", raw=raw, think=think)
    raw, system = exclusive(ctx, "a system prompt needs the chat template; drop --raw", raw=raw, system=system)
    job = LocalJob(ctx, model, runtime, quiet=quiet)
    check_trace_path(trace_file, inputs=(file, schema_file, image), overwrite=overwrite)
    flags = sampler.flags(max_new_tokens=max_new_tokens)
    if server:
        refuse_local_only(ctx, LOCAL_ONLY)
    schema = _read_schema(schema_file, retries, observed=show_steps or trace_file is not None or think)
    if image and (raw or schema is not None):
        from diffgen.errors import UsageError

        raise UsageError(f"--image does not combine with {'--raw' if raw else '--schema'}: the chat template "
                         "places the images", f"drop {'--raw' if raw else '--schema'} or --image")
    pictures, stdin_taken = read_images(image, prompt)
    text = _compose(prompt, file or (), no_stdin=no_stdin or stdin_taken, quiet=quiet)

    ask = Ask(text, system=system, raw=raw, think=think, pictures=pictures, flags=flags, seed=seed)
    watch = Watch(job.console, show_steps=show_steps, trace_file=trace_file, model=model, quiet=quiet)
    if server:
        explicit = parameter_source(ctx, "model") in ("COMMANDLINE", "ENVIRONMENT", None)
        answer, trace_failure = RemoteRun(server, model if explicit else None, ask).answer(watch)
    elif schema is not None:
        local = LocalRun(job, ask)
        _schema_run(job, local.encode()[0], schema, retries=retries, json_output=json_output, stats=stats)
        return
    else:
        answer, trace_failure = LocalRun(job, ask).answer(watch)
    answer_out(lambda: write_answer(answer, job.console, json_output=json_output, thoughts=think and not show_steps,
                                    stats=stats), trace_failure)


def _read_schema(schema_file: Optional[Path], retries: int, *, observed: bool) -> Optional[dict]:
    """``--schema``'s JSON Schema (``observed``: --show-steps, --trace or --think, which it does
    not combine with yet)."""
    from diffgen.errors import UsageError

    if schema_file is None:
        if retries:
            raise UsageError("--retries resamples the value slots of --schema", "add --schema FILE or drop --retries")
        return None
    from diffgen.denoise.constrained.schema import load_schema

    if observed:
        raise UsageError("--schema does not combine with --show-steps, --trace or --think yet", "drop one of them")
    with doing("reading the schema"):
        return load_schema(schema_file.read_text(encoding="utf-8"), f"the schema {schema_file.name}")


def _compose(prompt: Optional[str], files: Any, *, no_stdin: bool, quiet: bool) -> str:
    """The prompt: stdin (unless ``no_stdin``), the files and the argument; its warnings said."""
    from diffgen import prompt as prompt_mod

    with doing("reading the prompt"):
        stdin = None if no_stdin else prompt_mod.read_stdin(sys.stdin)
        composed = prompt_mod.compose(prompt, stdin, files)
    for warning in composed.warnings if not quiet else ():
        typer.echo(f"diffgen: warning: {warning}", err=True)
    return composed.text


# Flags of a local run that mean nothing for a model behind --server (parameter -> flag).
LOCAL_ONLY = {"device": "--device", "exact": "--exact", "fast": "--fast", "compile": "--compile", "quant": "--quant",
              "max_memory": "--max-memory", "offload": "--offload", "offline": "--offline", "schema_file": "--schema",
              "retries": "--retries"}


def _schema_run(job: LocalJob, ids: list[int], schema: dict, *, retries: int, json_output: bool,
                stats: bool) -> None:
    """``run --schema``: lay out the schema (context checked before the weights), generate, print."""
    from diffgen.denoise.constrained import schema as schema_mod
    from diffgen.ui import render

    prepared, tokenizer = job.prepared, job.tokenizer
    settings = prepared.settings
    text_config = prepared.config.get("text_config", prepared.config)
    with doing("laying out the schema"):
        vocab = schema_mod.vocabulary(tokenizer, int(text_config.get("vocab_size", len(tokenizer))),
                                      settings.pad_token_id)
        plan = schema_mod.layout(schema, tokenizer, vocab, job.canvas_length)
    job.check_context(len(ids), settings.replace(max_new_tokens=len(plan.tokens)))
    loaded = job.load()
    with doing("generating"):
        with status(job.console, "Denoising", quiet=job.quiet):
            result = schema_mod.generate_json(loaded, ids, schema, settings, retries=retries,
                                              execution=job.execution, vocab=vocab)

    def write() -> None:
        if json_output:
            render.write_json(schema_record(result, model=job.model), sys.stdout)
        else:
            sys.stdout.write(result.text + "\n")
            sys.stdout.flush()
        if stats:
            unsure = sum(slot.mean_entropy > schema_mod.RETRY_ENTROPY for slot in result.slots)
            typer.echo(f"{len(result.slots)} slots ({unsure} unsure) | {result.forwards} decoder passes | "
                       f"{result.seconds:.2f} s", err=True)

    answer_out(write, None)


def schema_record(result: SchemaResult, *, model: str) -> dict:
    """The ``--json`` object of ``run --schema``."""
    return {
        "text": result.text,
        "value": result.value,
        "slots": [{"path": slot.path, "kind": slot.kind, "value": slot.value, "start": slot.start, "end": slot.end,
                   "tokens": list(slot.token_ids), "mean_entropy": slot.mean_entropy, "repaired": slot.repaired,
                   "attempts": slot.attempts} for slot in result.slots],
        "model": model,
        "seed": result.settings.seed,
        "prompt_tokens": result.prompt_tokens,
        "schema_tokens": result.layout.length,
        "steps_per_canvas": [list(steps) for steps in result.steps_per_canvas],
        "forwards": result.forwards,
        "seconds": result.seconds,
        "settings": result.settings.to_dict(),
    }
