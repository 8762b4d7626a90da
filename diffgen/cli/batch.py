"""``diffgen batch``: many prompts, batched on the model, one JSONL record each, nothing lost."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffgen.cli.common import check_new_tokens, load_model, offload_note, parameter_source, read_input, refuse_local_only
from diffgen.cli.funnel import error_funnel
from diffgen.cli.options import (
    DEFAULT_MODEL,
    ConfidenceOption,
    DeviceOption,
    EntropyBoundOption,
    MaxMemoryOption,
    MaxNewTokensOption,
    ModelOption,
    NoColorOption,
    OffloadOption,
    OfflineOption,
    QuantOption,
    RawOption,
    ServerOption,
    StabilityOption,
    StepsOption,
    SystemOption,
    ThinkOption,
    TMaxOption,
    TMinOption,
    sampler_flags,
)
from diffgen.loading.prepare import auto_batch_rows, prepare
from diffgen.records.batch import FORMAT_RULE


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
# Seconds between progress lines when stderr is not a terminal (a log file, CI, nohup).
PROGRESS_INTERVAL = 5.0


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
    steps: StepsOption = None,
    entropy_bound: EntropyBoundOption = None,
    t_min: TMinOption = None,
    t_max: TMaxOption = None,
    stability: StabilityOption = None,
    confidence: ConfidenceOption = None,
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
        from diffgen.errors import UsageError
        from diffgen.records import batch as batch_mod
        from diffgen import prompt as prompt_mod
        from diffgen.ui import render

        # Everything that can be refused is refused here, before a model is read.
        if server:
            refuse_local_only(ctx, REMOTE_REFUSED)
        elif parameter_source(ctx, "concurrency") == "COMMANDLINE":
            raise UsageError("--concurrency is the number of requests in flight to a --server",
                             "add --server URL, or use --batch-size for a local batch")
        size = _batch_size(batch_size)  # None: auto, decided from the memory plan once the checkpoint is known
        if input_format not in ("auto", "jsonl", "text"):
            raise UsageError(f"--format {input_format!r}: use auto, jsonl or text")
        batch_mod.check_output(output, input_path, resume=resume, overwrite=overwrite, inputs=(schema_file,))
        if output is not None:
            from diffgen import outputs

            # One writer at a time: a second batch on the same output stops here, before it reads
            # or writes anything (the lock goes with this process, however it ends).
            held.enter_context(outputs.lock(output, "-o"))
        schema = None
        if schema_file is not None:
            from diffgen.denoise.constrained.schema import load_schema

            schema = load_schema(schema_file.read_text(encoding="utf-8"), f"the schema {schema_file.name}")
            if think:
                raise UsageError("--schema does not combine with --think yet", "drop one of them")
        elif retries:
            raise UsageError("--retries resamples the value slots of --schema", "add --schema FILE or drop --retries")
        data, name = read_input(input_path)
        text, warning = prompt_mod.decode_input(data, name)
        if warning:
            typer.echo(f"diffgen: warning: {warning}", err=True)
        lines = batch_mod.input_lines(text)
        if not any(line.strip() for line in lines):
            raise UsageError(f"no prompts in {name}: it is empty", "give one prompt per line, or JSONL records")
        items = list(batch_mod.parse(lines, input_format, name))
        console = render.error_console()
        if server:
            summary = _remote(ctx, batch_mod, items, server, output, console, model=model, resume=resume,
                              overwrite=overwrite, quiet=quiet, concurrency=concurrency, seed=seed, system=system,
                              raw=raw, think=think,
                              images_dir=Path(input_path).parent if input_path != "-" else Path("."),
                              flags=sampler_flags(max_new_tokens, steps, entropy_bound, t_min, t_max, stability,
                                                  confidence))
            _report_failures(summary, output)
            return
        prepared = prepare(
            model, offline=offline, device=device, quant=quant, max_memory=max_memory, offload=offload,
            batch=size or 1,
            **sampler_flags(max_new_tokens, steps, entropy_bound, t_min, t_max, stability, confidence),
        )
        defaults = prepared.settings
        check_new_tokens(prepared)
        offload_note(prepared, offload, quiet=quiet)
        if output is not None:
            kept = _kept_settings(prepared, model=model, seed=seed, system=system, raw=raw, think=think)
            kept["schema"] = schema
            _check_settings(ctx, batch_mod, output, kept, resume=resume, quiet=quiet)
        out = batch_mod.Output(output, resume=resume, overwrite=overwrite, stdout=sys.stdout)
        try:
            if out.retrying and not quiet:
                typer.echo(f"diffgen: retrying {out.retrying} record(s) that failed before", err=True)
            if size is None:
                size = auto_batch_rows(prepared)
                if not quiet:
                    typer.echo(f"diffgen: batch size {size} (auto, from the memory plan)", err=True)
            loaded = load_model(prepared, console, quiet=quiet)
            summary = _run(batch_mod, items, loaded, defaults, seed, size, out, console, model,
                           system=system, raw=raw, think=think, show=not quiet, schema=schema, retries=retries,
                           images_dir=Path(input_path).parent if input_path != "-" else Path("."))
        finally:
            out.close()
        _report_failures(summary, output)


def _report_failures(summary: Any, output: Optional[Path]) -> None:
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
# Seconds at most that one record waits, in all, for a busy server (429/503 with Retry-After).
BUSY_PATIENCE = 600.0


def _remote(ctx: typer.Context, batch_mod: Any, items: list, server: str, output: Optional[Path], console: Any, *,
            model: str, resume: bool, overwrite: bool, quiet: bool, concurrency: int, seed: int,
            system: Optional[str], raw: bool, think: bool, flags: dict[str, Any], images_dir: Path) -> Any:
    """``batch --server``: every record is one request to an OpenAI-compatible server, ``concurrency``
    of them in flight; the output, its settings file, ``--resume`` and error records are those of a
    local batch. A record's images (paths relative to the input file) go as PNG data URLs."""
    from diffgen.cli.funnel import doing
    from diffgen.remote import requests as remote
    from diffgen.remote.client import Client, RemoteError, Retry

    client = Client(server)
    try:
        explicit = parameter_source(ctx, "model") in ("COMMANDLINE", "ENVIRONMENT", None)
        with doing("asking the server for its model"):
            served = client.model(model if explicit else None)
        if output is not None:
            generation = {k: v for k, v in remote.settings(served, flags, seed).items() if k != "seed"}
            kept = {"model": served.id, "seed": seed, "system": system, "raw": raw, "think": think, **generation,
                    "schema": None}
            _check_settings(ctx, batch_mod, output, kept, resume=resume, quiet=quiet)
        out = batch_mod.Output(output, resume=resume, overwrite=overwrite, stdout=sys.stdout)

        def send(job: Any) -> dict[str, Any]:
            record_seed = batch_mod.seed_for(job, seed)
            record_flags = {**flags, **dict(job.overrides)}
            image_urls: tuple[str, ...] = ()
            if job.images:
                from diffgen import images

                image_urls = tuple(images.data_url(images.read_image_file(images_dir / path, flag="image"))
                                   for path in job.images)
            body, chat = remote.body(served.id, job.prompt, system=job.system or system, think=job.think or think,
                                     raw=job.raw or raw, flags=record_flags, seed=record_seed, image_urls=image_urls)
            waited = 0.0
            while True:
                try:
                    answer = client.complete(body, chat=chat)
                    break
                except Retry as busy:
                    if waited >= BUSY_PATIENCE:
                        raise
                    time.sleep(busy.after)  # the server said when to come back
                    waited += busy.after
            return remote.record(answer, model=served.id, seed=record_seed,
                                 settings=remote.settings(served, record_flags, record_seed))

        def unreachable(exc: BaseException) -> bool:
            """Whether no record can succeed now: the server is gone, or refuses the key or the model."""
            return isinstance(exc, RemoteError) and ((exc.status is None and exc.retryable)
                                                     or exc.status in (401, 403, 404))

        try:
            if out.retrying and not quiet:
                typer.echo(f"diffgen: retrying {out.retrying} record(s) that failed before", err=True)
            if not quiet:
                typer.echo(f"diffgen: sending to {client.url} ({served.id}), {concurrency} request(s) at a time",
                           err=True)
            start = time.perf_counter()
            progress: Any = None
            if not quiet:
                progress = _Progress(console) if console.is_terminal else _LineProgress(sys.stderr, PROGRESS_INTERVAL)
            try:
                summary = batch_mod.run_concurrent(items, send=send, output=out, concurrency=concurrency,
                                                   fatal=unreachable,
                                                   progress=progress.update if progress else lambda s, t: None)
            except RemoteError as exc:
                where = f"{output}" if output is not None else "the output"
                raise RemoteError(exc.message, f"{exc.hint + '; ' if exc.hint else ''}the records finished are in "
                                               f"{where}: rerun with --resume to do the rest") from exc
            finally:
                if progress:
                    progress.stop()
        finally:
            out.close()
    finally:
        client.close()
    if not quiet:
        _summary_line(summary, time.perf_counter() - start)
    return summary


def _summary_line(summary: Any, elapsed: float) -> None:
    typer.echo(
        f"diffgen: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped of {summary.total} "
        f"records in {elapsed:.1f} s ({summary.done / elapsed if elapsed else 0:.2f} records/s, "
        f"{summary.tokens / elapsed if elapsed else 0:.1f} tokens/s)",
        err=True,
    )


def _kept_settings(prepared: Any, *, model: str, seed: int, system: Optional[str], raw: bool,
                   think: bool) -> dict[str, Any]:
    """The settings that change a record's answer, as kept in OUTPUT.settings.json."""
    generation = {k: v for k, v in prepared.settings.to_dict().items() if k != "seed"}
    return {"model": model, "checkpoint": str(prepared.checkpoint.path), "weights": prepared.plan.scheme,
            "device": prepared.plan.device, "seed": seed, "system": system, "raw": raw, "think": think,
            **generation}


def _check_settings(ctx: typer.Context, batch_mod: Any, output: Path, kept: dict[str, Any], *, resume: bool,
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


def _run(batch_mod: Any, items: list, loaded: Any, defaults: Any, base_seed: int, size: int, out: Any,
         console: Any, model: str, *, system: Optional[str], raw: bool, think: bool, show: bool,
         schema: Optional[dict] = None, retries: int = 0, images_dir: Path = Path(".")) -> Any:
    from diffgen.denoise import loop
    from diffgen.ui import render
    from diffgen import prompt as prompt_mod

    vocab = None
    if schema is not None:
        from diffgen.cli.run import schema_record
        from diffgen.denoise.constrained import schema as schema_mod

        vocab = schema_mod.vocabulary(loaded.tokenizer, int(loaded.model.config.text_config.vocab_size),
                                      defaults.pad_token_id)
        plan = schema_mod.layout(schema, loaded.tokenizer, vocab, int(loaded.model.config.canvas_length))

    processor: list[Any] = []  # transformers' processor, built at the first record with images

    def encode_images(job: Any, settings: Any) -> list[int]:
        """A record's ids and images (paths relative to the input file), as ``run --image`` does."""
        from diffgen import images
        from diffgen.errors import UsageError

        if schema is not None or raw:
            raise UsageError(f"images do not combine with {'--schema' if schema is not None else '--raw'} yet")
        pictures = [images.read_image_file(images_dir / path, flag="image") for path in job.images]
        if not processor:
            processor.append(images.load_processor(loaded.checkpoint.path, loaded.tokenizer,
                                                   loaded.model.config.to_dict()))
        ids, vision = images.encode(processor[0], job.prompt, pictures, system=job.system or system,
                                    think=job.think or think)
        images.check_positions(vision, loaded.model.config.to_dict(), pictures)
        canvas = int(loaded.model.config.canvas_length)
        images.check_image_context(vision, len(ids), loaded.model.config.get_text_config().max_position_embeddings,
                                   -(-settings.max_new_tokens // canvas) * canvas)
        loop.check_context(loaded.model, len(ids), settings)
        return images.IdsWithImages(ids, vision)

    def encode(job: Any, settings: Any) -> list[int]:
        if job.images:
            return encode_images(job, settings)
        ids = prompt_mod.encode(loaded.tokenizer, job.prompt, system=job.system or system,
                                think=job.think or think, raw=job.raw or raw)
        if schema is not None:
            settings = settings.replace(max_new_tokens=len(plan.tokens))
        loop.check_context(loaded.model, len(ids), settings)
        return ids

    def generate_batch(prompts: list[list[int]], settings: Any, seeds: list[int]) -> list[dict]:
        if schema is not None:
            results = schema_mod.generate_json_rows(loaded, prompts, schema, settings, seeds=seeds, retries=retries,
                                                    vocab=vocab)
            return [{**schema_record(r, model=model), "tokens": list(r.token_ids[:r.layout.length])}
                    for r in results]
        vision = [getattr(ids, "vision", None) for ids in prompts]
        result = loop.generate(loaded, prompts, settings, seeds=seeds,
                                   vision=vision if any(v is not None for v in vision) else None)
        return [render.completion_record(c, result, model=model, seed=s) for c, s in zip(result.completions, seeds)]

    start = time.perf_counter()
    progress: Any = None
    if show:
        progress = _Progress(console) if console.is_terminal else _LineProgress(sys.stderr, PROGRESS_INTERVAL)
    try:
        summary = batch_mod.run(items, encode=encode, generate_batch=generate_batch, defaults=defaults,
                                base_seed=base_seed, batch_size=size, output=out,
                                progress=progress.update if progress else lambda summary, tokens: None)
    finally:
        if progress:
            progress.stop()
    if show:
        _summary_line(summary, time.perf_counter() - start)
    return summary


class _Progress:
    """A Rich progress bar on stderr: records done/total, tokens/s, ETA."""

    def __init__(self, console: Any):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("records"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} tok/s"),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None
        self.start = time.perf_counter()
        self.progress.start()

    def update(self, summary: Any, tokens: int) -> None:
        todo = summary.total - summary.skipped
        if self.task is None:
            self.task = self.progress.add_task("records", total=todo, rate="0.0")
        elapsed = time.perf_counter() - self.start
        self.progress.update(self.task, completed=summary.done,
                             rate=f"{summary.tokens / elapsed if elapsed else 0:.1f}")

    def stop(self) -> None:
        self.progress.stop()


class _LineProgress:
    """Progress for a stderr that is not a terminal (a log file, CI, ``nohup``): one plain line
    at the start and then at most one every ``interval`` seconds, so a long job shows it is alive
    without flooding the log. ``clock`` is injectable so tests need no waiting."""

    def __init__(self, stream: Any, interval: float, clock: Any = time.monotonic):
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.start = clock()
        self.last: float | None = None

    def update(self, summary: Any, tokens: int) -> None:
        now = self.clock()
        todo = summary.total - summary.skipped
        if not todo or (self.last is not None and now - self.last < self.interval):
            return
        self.last = now
        elapsed = now - self.start
        line = f"diffgen: progress: {summary.done}/{todo} records"
        if summary.failed:
            line += f" ({summary.failed} failed)"
        if elapsed > 0 and summary.done:
            line += f", {summary.tokens / elapsed:.1f} tokens/s"
            left = elapsed / summary.done * (todo - summary.done)
            line += f", about {_duration(left)} left" if todo > summary.done else ""
        self.stream.write(line + "\n")
        self.stream.flush()

    def stop(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
