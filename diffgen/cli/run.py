"""``diffgen run``: one prompt in, the answer on stdout."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffgen.cli.common import (
    check_trace_path,
    encode_with_images,
    exclusive,
    load_model,
    observing,
    parameter_source,
    prepare_generation,
    read_images,
    refuse_local_only,
    status,
)
from diffgen.cli.funnel import doing
from diffgen.cli.options import (
    CompileOption,
    DEFAULT_MODEL,
    ConfidenceOption,
    DeviceOption,
    EntropyBoundOption,
    ExactOption,
    FastOption,
    ImageOption,
    MaxMemoryOption,
    MaxNewTokensOption,
    ModelOption,
    NoColorOption,
    OverwriteOption,
    NoStdinOption,
    OffloadOption,
    OfflineOption,
    QuantOption,
    QuietOption,
    RawOption,
    SeedOption,
    ServerOption,
    StabilityOption,
    StepsOption,
    SystemOption,
    ThinkOption,
    TMaxOption,
    TMinOption,
    sampler_choice,
    sampler_flags,
)

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
    steps: StepsOption = None,
    entropy_bound: EntropyBoundOption = None,
    t_min: TMinOption = None,
    t_max: TMaxOption = None,
    stability: StabilityOption = None,
    confidence: ConfidenceOption = None,
    seed: SeedOption = None,
    device: DeviceOption = "auto",
    exact: ExactOption = False,
    fast: FastOption = False,
    compile: CompileOption = False,
    quant: QuantOption = "auto",
    max_memory: MaxMemoryOption = None,
    offload: OffloadOption = False,
    offline: OfflineOption = False,
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
    from diffgen import prompt as prompt_mod

    # Every flag is checked before anything is read or loaded.
    raw, think = exclusive(ctx, "thinking mode needs the chat template; drop --raw", raw=raw, think=think)
    raw, system = exclusive(ctx, "a system prompt needs the chat template; drop --raw", raw=raw, system=system)
    exact, fast = exclusive(ctx, "give one of them, or neither for the device's default", exact=exact, fast=fast)
    exact_loop = sampler_choice(exact, fast, compile)
    check_trace_path(trace_file, inputs=(file, schema_file, image), overwrite=overwrite)
    flags = sampler_flags(max_new_tokens, steps, entropy_bound, t_min, t_max, stability, confidence)
    if server:
        refuse_local_only(ctx, LOCAL_ONLY)
    schema = None
    if schema_file is not None:
        from diffgen.denoise.constrained.schema import load_schema
        from diffgen.errors import UsageError

        if show_steps or trace_file is not None or think:
            raise UsageError("--schema does not combine with --show-steps, --trace or --think yet",
                             "drop one of them")
        with doing("reading the schema"):
            schema = load_schema(schema_file.read_text(encoding="utf-8"), f"the schema {schema_file.name}")
    elif retries:
        from diffgen.errors import UsageError

        raise UsageError("--retries resamples the value slots of --schema", "add --schema FILE or drop --retries")
    if image and (raw or schema is not None):
        from diffgen.errors import UsageError

        raise UsageError(f"--image does not combine with {'--raw' if raw else '--schema'}: the chat template "
                         "places the images", f"drop {'--raw' if raw else '--schema'} or --image")
    pictures, stdin_taken = read_images(image, prompt)

    with doing("reading the prompt"):
        stdin = None if no_stdin or stdin_taken else prompt_mod.read_stdin(sys.stdin)
        composed = prompt_mod.compose(prompt, stdin, file or ())
    for warning in composed.warnings if not quiet else ():
        typer.echo(f"diffgen: warning: {warning}", err=True)

    from diffgen.ui import render

    console = render.error_console()
    if server:
        explicit = parameter_source(ctx, "model") in ("COMMANDLINE", "ENVIRONMENT", None)
        _remote_run(server, composed.text, console, model=model if explicit else None, system=system, raw=raw,
                    think=think, flags=flags, seed=seed, json_output=json_output, stats=stats, show_steps=show_steps,
                    trace_file=trace_file, quiet=quiet, pictures=pictures)
        return
    prepared = prepare_generation(model, seed=seed, flags=flags, quiet=quiet, offline=offline, device=device, quant=quant,
                                  max_memory=max_memory, offload=offload, images=len(pictures))
    settings = prepared.settings
    from diffgen.denoise import loop
    from diffgen.loading import loader

    # Tokenise and check the context before the (long) weight load.
    with doing("loading the tokenizer"):
        tokenizer = loader.load_tokenizer(prepared.checkpoint.path)
        # Refused by its size before it is tokenised (50 MB of text would take a minute and GBs).
        prompt_mod.check_fits(composed.text, prepared.config.get("text_config", prepared.config)
                              .get("max_position_embeddings"), tokenizer)
        ids = prompt_mod.encode(tokenizer, composed.text, system=system, think=think, raw=raw)
    vision = None
    if pictures:
        ids, vision = encode_with_images(prepared, tokenizer, composed.text, pictures, system=system, think=think)
    if schema is not None:
        _schema_run(prepared, tokenizer, ids, schema, console, model=model, retries=retries, exact=exact_loop,
                    compile=compile, quiet=quiet, json_output=json_output, stats=stats)
        return
    loop.check_context_config(prepared.config, len(ids), settings)
    loaded = load_model(prepared, console, quiet=quiet, tokenizer=tokenizer)
    trace_failure = None
    with doing("generating"):
        if show_steps or trace_file is not None:
            result, trace_failure = _observed(loaded, ids, settings, console, show_steps=show_steps, trace_file=trace_file,
                               model=model, prompt=composed.text, exact=exact_loop, compile=compile, vision=vision)
        else:
            with status(console, "Denoising", quiet=quiet):
                result = loop.generate(loaded, [ids], settings, exact=exact_loop, compile=compile,
                                           vision=[vision])
    completion = result.completions[0]

    with doing("writing the answer to stdout"):
        if json_output:
            render.write_json(render.completion_record(completion, result, model=model), sys.stdout)
        else:
            if think and completion.thoughts and not show_steps:
                render.show_thoughts(completion.thoughts, console)
            render.write_answer(completion, sys.stdout)
        if stats:
            typer.echo(render.stats_line(completion), err=True)
    if trace_failure is not None:
        raise trace_failure  # the answer is out; the trace could not be written


# Flags of a local run that mean nothing for a model behind --server (parameter -> flag).
LOCAL_ONLY = {"device": "--device", "exact": "--exact", "fast": "--fast", "compile": "--compile", "quant": "--quant",
              "max_memory": "--max-memory", "offload": "--offload", "offline": "--offline", "schema_file": "--schema",
              "retries": "--retries"}


def _remote_run(server: str, text: str, console: Any, *, model: Optional[str], system: Optional[str], raw: bool,
                think: bool, flags: dict[str, Any], seed: Optional[int], json_output: bool, stats: bool,
                show_steps: bool, trace_file: Optional[Path], quiet: bool, pictures: list[Any]) -> None:
    """``run --server``: the same prompt, flags and output as a local run, generated by a server."""
    import secrets

    from diffgen.errors import UsageError
    from diffgen.remote import requests as remote
    from diffgen.remote.client import Client
    from diffgen.ui import render

    seed = seed if seed is not None else secrets.randbelow(2**31)
    with Client(server) as client:
        with doing("asking the server for its model"):
            served = client.model(model)
        observe = show_steps or trace_file is not None
        if observe and (served.settings is None or served.canvas_length is None):
            raise UsageError(f"the server at {client.url} does not stream denoising steps, so --show-steps and "
                             "--trace cannot draw them (diffgen serve does; other OpenAI-compatible servers do not)",
                             "drop --show-steps / --trace")
        image_urls: tuple[str, ...] = ()
        if pictures:
            from diffgen.images import data_url

            image_urls = tuple(data_url(picture) for picture in pictures)
        body, chat = remote.body(served.id, text, system=system, think=think, raw=raw, flags=flags, seed=seed,
                                 image_urls=image_urls)
        settings = remote.settings(served, flags, seed)
        trace_failure = None
        with doing("generating on the server"):
            if observe:
                with observing(console, None, show_steps=show_steps, trace_file=trace_file, model=served.id,
                               prompt=text, settings=settings, canvas_length=int(served.canvas_length),
                               channel_ids=served.channel_ids) as observer:
                    answer = remote.stream_answer(client, body, chat=chat, on_record=observer.on_record)
                    if observer.writer is not None:
                        observer.writer.result({"text": answer.text, "thoughts": answer.thoughts,
                                                "finish_reason": answer.finish_reason, "stats": answer.stats})
                trace_failure = observer.failure
            else:
                with status(console, "Denoising on the server", quiet=quiet):
                    answer = client.complete(body, chat=chat)

    with doing("writing the answer to stdout"):
        if json_output:
            render.write_json(remote.record(answer, model=served.id, seed=seed, settings=settings), sys.stdout)
        else:
            if think and answer.thoughts and not show_steps:
                render.show_thoughts(answer.thoughts, console)
            render.write_answer(answer, sys.stdout)
        if stats:
            if answer.stats is not None:
                typer.echo(render.stats_line_of(answer.stats, answer.finish_reason), err=True)
            else:
                usage = answer.usage or {}
                typer.echo(render.usage_line(usage.get("completion_tokens"), usage.get("prompt_tokens"),
                                             answer.seconds, answer.finish_reason), err=True)
    if trace_failure is not None:
        raise trace_failure  # the answer is out; the trace could not be written


def _schema_run(prepared: Any, tokenizer: Any, ids: list[int], schema: dict, console: Any, *, model: str,
                retries: int, exact: Optional[bool], compile: bool, quiet: bool, json_output: bool,
                stats: bool) -> None:
    """``run --schema``: lay out the schema (context checked before the weights), generate, print."""
    from diffgen.denoise import loop
    from diffgen.denoise.constrained import schema as schema_mod
    from diffgen.ui import render

    settings = prepared.settings
    text_config = prepared.config.get("text_config", prepared.config)
    with doing("laying out the schema"):
        vocab = schema_mod.vocabulary(tokenizer, int(text_config.get("vocab_size", len(tokenizer))),
                                      settings.pad_token_id)
        plan = schema_mod.layout(schema, tokenizer, vocab, int(prepared.config.get("canvas_length", 256)))
    loop.check_context_config(prepared.config, len(ids), settings.replace(max_new_tokens=len(plan.tokens)))
    loaded = load_model(prepared, console, quiet=quiet, tokenizer=tokenizer)
    with doing("generating"):
        with status(console, "Denoising", quiet=quiet):
            result = schema_mod.generate_json(loaded, ids, schema, settings, retries=retries, exact=exact,
                                              compile=compile, vocab=vocab)
    with doing("writing the answer to stdout"):
        if json_output:
            render.write_json(schema_record(result, model=model), sys.stdout)
        else:
            sys.stdout.write(result.text + "\n")
            sys.stdout.flush()
        if stats:
            unsure = sum(slot.mean_entropy > schema_mod.RETRY_ENTROPY for slot in result.slots)
            typer.echo(f"{len(result.slots)} slots ({unsure} unsure) | {result.forwards} decoder passes | "
                       f"{result.seconds:.2f} s", err=True)


def schema_record(result: Any, *, model: str) -> dict:
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


def _observed(loaded: Any, ids: list[int], settings: Any, console: Any, *, show_steps: bool,
              trace_file: Optional[Path], model: str, prompt: str, exact: Optional[bool],
              compile: bool = False, vision: Any = None) -> tuple[Any, Optional[BaseException]]:
    """Run a generation whose steps feed the live view and/or a trace file; return its result and
    the trace's write error (``None`` when it was written)."""
    from diffgen.denoise import loop

    generation = loop.stream(loaded, [ids], settings, observe=True, exact=exact, compile=compile,
                                 vision=[vision])
    with observing(console, loaded.tokenizer, show_steps=show_steps, trace_file=trace_file, model=model,
                   prompt=prompt, settings=settings, canvas_length=generation.canvas_length) as observer:
        for event in generation:
            observer.on_event(event)
        result = generation.result
        if observer.writer is not None:
            completion = result.completions[0]
            observer.writer.result({"text": completion.text, "thoughts": completion.thoughts,
                                    "finish_reason": completion.finish_reason,
                                    "stats": dataclasses.asdict(completion.stats)})
    return result, observer.failure
