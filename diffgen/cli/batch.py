"""``diffgen batch``: many prompts, batched on the model, one JSONL record each, nothing lost."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from diffgen.cli.support import batch_runner
from diffgen.cli.support.batch_backends import LocalBatch, PromptFlags, RemoteBatch
from diffgen.cli.support.common import check_new_tokens, offload_note, parameter_source, read_input, refuse_local_only
from diffgen.cli.support.funnel import doing, error_funnel
from diffgen.cli.support.option_groups import Sampler, grouped
from diffgen.cli.support.options import (
    DEFAULT_MODEL,
    DeviceOption,
    MaxMemoryOption,
    MaxNewTokensOption,
    ModelOption,
    NoColorOption,
    OffloadOption,
    OfflineOption,
    QuantOption,
    RawOption,
    ServerOption,
    SystemOption,
    ThinkOption,
)
from diffgen.loading.prepare import prepare
from diffgen.records import batch as batch_mod
from diffgen.records.batch import FORMAT_RULE

if TYPE_CHECKING:
    from rich.console import Console

    from diffgen.cli.support.batch_runner import Summary
    from diffgen.remote.client import Client


EPILOG = (
    "Examples:\n\n"
    "  diffgen batch prompts.txt -o answers.jsonl           (one prompt per line; ids are line numbers)\n\n"
    "  diffgen batch jobs.jsonl -o out.jsonl --batch-size 16 --seed 7\n\n"
    "  diffgen batch jobs.jsonl -o out.jsonl --resume       (after Ctrl-C, a crash or failed records)\n\n"
    "  cat jobs.jsonl | diffgen batch - > out.jsonl\n\n"
    "  diffgen batch jobs.jsonl -o out.jsonl --server http://gpu-box:8000 --concurrency 64   (diffgen serve or vLLM)\n\n"
    'JSONL records: {"id": ..., "prompt": ...} plus optional system, think, raw, seed, max_new_tokens, steps, '
    'entropy_bound, t_min, t_max, stability, confidence. An id is a string or an integer; 3 and "3" are two '
    f"ids. --format {FORMAT_RULE}. A UTF-8 byte order mark is fine.\n\n"
    "Output records: id, line, text, tokens, finish_reason, stats (or error). The settings that change answers "
    "(model, weights, device, seed, sampler flags, --system/--raw/--think) are kept beside -o OUTPUT in "
    "OUTPUT.settings.json; --resume refuses to continue with other ones unless the flag that changes them is given "
    "on the command line, which is then recorded there. Exit status 1 when any record failed (--resume retries it)."
)

# What each kept setting is called on the command line, and the parameters that can change it.
SETTING_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "model": ("--model", ("model",)),
    "checkpoint": ("--model", ("model",)),
    "weights": ("--quant", ("quant", "max_memory", "device")),
    "device": ("--device", ("device",)),
    "seed": ("--seed", ("seed",)),
    "system": ("--system", ("system",)),
    "raw": ("--raw", ("raw",)),
    "think": ("--think", ("think",)),
    "max_new_tokens": ("--max-new-tokens", ("max_new_tokens",)),
    "max_denoising_steps": ("--steps", ("steps",)),
    "entropy_bound": ("--entropy-bound", ("entropy_bound",)),
    "t_min": ("--t-min", ("t_min",)),
    "t_max": ("--t-max", ("t_max",)),
    "stability_threshold": ("--stability", ("stability",)),
    "confidence_threshold": ("--confidence", ("confidence",)),
    "eos_token_ids": ("--model", ("model",)),
    "pad_token_id": ("--model", ("model",)),
    "schema": ("--schema", ("schema_file",)),
}


@grouped
def batch(
    ctx: typer.Context,
    input_path: Annotated[str, typer.Argument(metavar="INPUT", help="JSONL or text file of prompts; - for stdin.")],
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", dir_okay=False,
                     help="JSONL file to append records to; its settings go to OUTPUT.settings.json.",
                     show_default="stdout"),
    ] = None,
    batch_size: Annotated[
        str, typer.Option("--batch-size", help="Records generated together: N, or auto (the most rows the memory "
                                               "plan fits, up to 32).")
    ] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUTPUT: skip the ids that succeeded, retry the "
                                                          "ones that failed, append the rest.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUTPUT.")] = False,
    input_format: Annotated[
        str, typer.Option("--format", help="auto, jsonl or text. auto: JSONL when every line is a JSON object (or "
                                           "the name ends .jsonl), text when none is; a mix is refused unless its "
                                           "first line and most lines are objects.")
    ] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no summary.")] = False,
    model: ModelOption = DEFAULT_MODEL,
    system: SystemOption = None,
    raw: RawOption = False,
    think: ThinkOption = False,
    max_new_tokens: MaxNewTokensOption = None,
    sampler: Sampler = Sampler(),
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Base seed; a record without its own seed gets one derived from "
                                                "this and its id.")
    ] = 0,
    device: DeviceOption = "auto",
    quant: QuantOption = "auto",
    max_memory: MaxMemoryOption = None,
    offload: OffloadOption = False,
    offline: OfflineOption = False,
    schema_file: Annotated[
        Optional[Path],
        typer.Option("--schema", exists=True, dir_okay=False, readable=True, show_default=False, metavar="<file>",
                     help="Answer every prompt with JSON that validates against this JSON Schema (the subset of "
                          "`run --schema`), valid by construction; records gain value and slots."),
    ] = None,
    retries: Annotated[
        int,
        typer.Option("--retries", min=0, max=10, metavar="<n>",
                     help="With --schema: resample up to N times the value slots that end unsure."),
    ] = 0,
    server: ServerOption = None,
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", min=1, max=1024, metavar="<n>",
                     help="With --server: requests in flight at once (a server batches those that arrive together)."),
    ] = 4,
    no_color: NoColorOption = False,
) -> None:
    """Generate an answer for every prompt in INPUT, writing one JSONL record per prompt."""
    with error_funnel("interrupted; finished records are in the output — rerun with --resume to do the rest"), \
            contextlib.ExitStack() as held:
        from diffgen.ui import render

        # Everything that can be refused is refused here, before a model is read.
        size = _check_flags(ctx, server, batch_size, input_format)
        batch_mod.check_output(output, input_path, resume=resume, overwrite=overwrite, inputs=(schema_file,))
        if output is not None:
            from diffgen import outputs

            # One writer at a time: a second batch on the same output stops here, before it reads
            # or writes anything (the lock goes with this process, however it ends).
            held.enter_context(outputs.lock(output, "-o"))
        schema = _read_schema(schema_file, think=think, retries=retries)
        items = _read_items(input_path, input_format)
        console = render.error_console()
        flags = sampler.flags(max_new_tokens=max_new_tokens)
        prompts = PromptFlags(system=system, raw=raw, think=think)
        images_dir = Path(input_path).parent if input_path != "-" else Path(".")
        backend: LocalBatch | RemoteBatch
        if server:
            client = held.enter_context(_client(server))
            explicit = parameter_source(ctx, "model") in ("COMMANDLINE", "ENVIRONMENT", None)
            with doing("asking the server for its model"):
                served = client.model(model if explicit else None)
            backend = RemoteBatch(client, served, flags=flags, base_seed=seed, prompts=prompts,
                                  concurrency=concurrency, images_dir=images_dir, output=output)
        else:
            prepared = prepare(model, offline=offline, device=device, quant=quant, max_memory=max_memory,
                               offload=offload, batch=size or 1, **flags)
            check_new_tokens(prepared)
            offload_note(prepared, offload, quiet=quiet)
            backend = LocalBatch(prepared, size, console, model=model, base_seed=seed, prompts=prompts,
                                 schema=schema, retries=retries, images_dir=images_dir)
        if output is not None:
            _check_settings(ctx, output, backend.kept(), resume=resume, quiet=quiet)
        summary = _generate_all(backend, items, console, output, resume=resume, overwrite=overwrite, quiet=quiet)
        _report_failures(summary, output)


def _client(server: str) -> Client:
    from diffgen.remote.client import Client

    return Client(server)


def _check_flags(ctx: typer.Context, server: Optional[str], batch_size: str, input_format: str) -> Optional[int]:
    """The flags that exclude each other or take a word; the batch size (``None``: auto, decided
    from the memory plan once the checkpoint is known)."""
    from diffgen.errors import UsageError

    if server:
        refuse_local_only(ctx, REMOTE_REFUSED)
    elif parameter_source(ctx, "concurrency") == "COMMANDLINE":
        raise UsageError("--concurrency is the number of requests in flight to a --server",
                         "add --server URL, or use --batch-size for a local batch")
    size = _batch_size(batch_size)
    if input_format not in ("auto", "jsonl", "text"):
        raise UsageError(f"--format {input_format!r}: use auto, jsonl or text")
    return size


def _read_schema(schema_file: Optional[Path], *, think: bool, retries: int) -> Optional[dict]:
    from diffgen.errors import UsageError

    if schema_file is None:
        if retries:
            raise UsageError("--retries resamples the value slots of --schema", "add --schema FILE or drop --retries")
        return None
    from diffgen.denoise.constrained.schema import load_schema

    schema = load_schema(schema_file.read_text(encoding="utf-8"), f"the schema {schema_file.name}")
    if think:
        raise UsageError("--schema does not combine with --think yet", "drop one of them")
    return schema


def _read_items(input_path: str, input_format: str) -> list:
    """The input's records: jobs and the lines that cannot be one."""
    from diffgen import prompt as prompt_mod
    from diffgen.errors import UsageError

    data, name = read_input(input_path)
    text, warning = prompt_mod.decode_input(data, name)
    if warning:
        typer.echo(f"diffgen: warning: {warning}", err=True)
    lines = batch_mod.input_lines(text)
    if not any(line.strip() for line in lines):
        raise UsageError(f"no prompts in {name}: it is empty", "give one prompt per line, or JSONL records")
    return list(batch_mod.parse(lines, input_format, name))


def _generate_all(backend: LocalBatch | RemoteBatch, items: list, console: Console, output: Optional[Path], *,
                  resume: bool, overwrite: bool, quiet: bool) -> Summary:
    """Every record not done yet through ``backend`` (:mod:`diffgen.cli.support.batch_backends`), appended
    to the output as it finishes, with progress and a summary on stderr unless ``quiet``."""
    out = batch_mod.Output(output, resume=resume, overwrite=overwrite, stdout=sys.stdout)
    try:
        if out.retrying and not quiet:
            typer.echo(f"diffgen: retrying {out.retrying} record(s) that failed before", err=True)
        backend.start(quiet)
        return batch_runner.with_progress(console, not quiet, lambda progress: backend.run(items, out, progress))
    finally:
        out.close()


def _report_failures(summary: Summary, output: Optional[Path]) -> None:
    if summary.failed:
        for failure in summary.failures[:5]:
            typer.echo(f"diffgen: failed: {failure}", err=True)
        if len(summary.failures) > 5:
            typer.echo(f"diffgen: ... and {len(summary.failures) - 5} more (see the error records)", err=True)
        if output is not None:
            typer.echo("diffgen: rerun with --resume to retry the failed records", err=True)
        raise typer.Exit(1)


# Flags of a local batch that mean nothing for a model behind --server (parameter -> flag).
REMOTE_REFUSED = {"device": "--device", "quant": "--quant", "max_memory": "--max-memory", "offload": "--offload",
                  "offline": "--offline", "batch_size": "--batch-size", "schema_file": "--schema",
                  "retries": "--retries"}
def _check_settings(ctx: typer.Context, output: Path, kept: dict[str, Any], *, resume: bool,
                    quiet: bool) -> None:
    """A new output gets its settings file; a resumed one must match it, except where a flag
    given on this command line changes a setting on purpose (recorded in the file)."""
    from diffgen import __version__
    from diffgen.errors import UsageError

    continuing = resume and output.exists() and output.stat().st_size > 0
    stored = batch_mod.read_settings(output) if continuing else None
    if stored is None:
        if continuing and not quiet:
            typer.echo(f"diffgen: warning: {output} has no settings file, so this run cannot check that it continues "
                       "it with the same settings; they are recorded from now on", err=True)
        batch_mod.write_settings(output, {"diffgen": __version__, "settings": kept, "changes": []})
        return
    changed = batch_mod.changed_settings(stored["settings"], kept)
    if not changed:
        return
    explicit = {name for name in ctx.params if _from_command_line(ctx, name)}
    refused = {k: v for k, v in changed.items() if not explicit & set(SETTING_FLAGS.get(k, ("", ()))[1])}
    if refused:
        shown = "; ".join(f"{_setting(k, old)} (this run: {_setting(k, new)})" for k, (old, new) in refused.items())
        raise UsageError(f"{output} was written with other settings: {shown}",
                         "pass the same flags to continue it, give a flag explicitly to change that setting for the "
                         "remaining records, or write to a new file")
    stored.setdefault("changes", []).append(
        {"after_records": _records_ok(output), "changed": {k: {"from": old, "to": new} for k, (old, new) in changed.items()}})
    stored["settings"] = kept
    batch_mod.write_settings(output, stored)
    if not quiet:
        shown = ", ".join(f"{_setting(k, new)} (was {_setting(k, old)})" for k, (old, new) in changed.items())
        typer.echo(f"diffgen: note: records written from now on use {shown}; recorded in "
                   f"{batch_mod.settings_path(output).name}", err=True)


def _records_ok(output: Path) -> int:
    """How many records of ``output`` succeeded (the point where changed settings take over)."""
    import json

    count = 0
    for line in output.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        count += isinstance(record, dict) and "error" not in record
    return count


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) == "COMMANDLINE"


def _setting(key: str, value: Any) -> str:
    """A kept setting as the user would write it: ``--steps 3``, ``--think``, ``no --raw``."""
    flag = SETTING_FLAGS.get(key, (key, ()))[0]
    if key in {"checkpoint", "eos_token_ids", "pad_token_id"}:
        return f"{key} {value}"
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if value is None:
        return f"no {flag}"
    text = str(value)
    return f"{flag} {text[:40] + '…' if len(text) > 40 else text}"


def _batch_size(value: str) -> int | None:
    from diffgen.errors import UsageError

    if value == "auto":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise UsageError(f"--batch-size {value!r}: use a positive integer or auto")
