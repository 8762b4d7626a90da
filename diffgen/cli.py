"""The ``diffgen`` command line: thin Typer commands over the library.

Each command parses its options, builds settings, calls the library and hands the result to a
renderer. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` and
``--version`` stay instant. Errors go through :func:`error_funnel`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffgen import __version__
from diffgen.errors import EXIT_INTERRUPTED, DiffgenError
from diffgen.loader import DEFAULT_MODEL  # the loader module imports nothing heavy at import time

app = typer.Typer(
    name="diffgen",
    help="Run DiffusionGemma text-diffusion models locally.",
    epilog=(
        "Examples:\n\n"
        '  diffgen run "Why is the sky blue?"\n\n'
        '  cat notes.md | diffgen run "Summarise this"\n\n'
        "  diffgen run --json --seed 7 -m ./my-checkpoint \"Write a haiku\"\n\n"
        "Set DIFFGEN_DEBUG=1 to see tracebacks."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"diffgen {__version__}"]
    for package in ("torch", "transformers"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} (not installed)")
    return ", ".join(parts)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True,
                     help="Print the versions of diffgen, torch and transformers, then exit."),
    ] = False,
) -> None:
    """Run DiffusionGemma text-diffusion models locally."""


def _debug() -> bool:
    return os.environ.get("DIFFGEN_DEBUG", "").strip() not in {"", "0"}


@contextlib.contextmanager
def error_funnel() -> Iterator[None]:
    """Known errors -> one line on stderr and their exit code; Ctrl-C -> exit 130."""
    try:
        yield
    except DiffgenError as exc:
        if _debug():
            raise
        message = f"diffgen: error: {exc.message}"
        if exc.hint:
            message += f" — {exc.hint}"
        typer.echo(message, err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if _debug():
            raise
        typer.echo("diffgen: interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # stdout was closed early (e.g. `diffgen run ... | head -1`): not an error.
        _silence_stdout()
        raise typer.Exit(0) from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


# Options shared by the commands that load a model.
ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", envvar="DIFFGEN_MODEL", show_envvar=True,
                 help="Hub id (resolved through the Hugging Face cache) or local checkpoint directory."),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps. auto: CUDA in bf16, else MPS, else CPU in fp32.")
]
OfflineOption = Annotated[
    bool, typer.Option("--offline", help="Never contact the Hub; use the local cache only (like HF_HUB_OFFLINE=1).")
]

RUN_EPILOG = (
    "Examples:\n\n"
    '  diffgen run "Why is the sky blue?"\n\n'
    '  cat notes.md | diffgen run "Summarise this"      (stdin, a blank line, then the argument)\n\n'
    '  diffgen run -f a.py -f b.py "What differs?"\n\n'
    '  diffgen run --think --stats "Is 1001 prime?"\n\n'
    '  diffgen run --json --seed 1 "Hello" | jq .text\n\n'
    "Generation runs in whole canvases (256 tokens for the released model); the answer is cut "
    "to --max-new-tokens."
)


@app.command(epilog=RUN_EPILOG)
def run(
    prompt: Annotated[
        Optional[str],
        typer.Argument(help="The prompt. Omit it or pass - to read the prompt from stdin.", show_default=False),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    file: Annotated[
        Optional[list[Path]],
        typer.Option("--file", "-f", exists=True, dir_okay=False, readable=True,
                     help="Add a file's text before the prompt (repeatable)."),
    ] = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: tokenise the text as is.")] = False,
    think: Annotated[
        bool, typer.Option("--think", help="Thinking mode; the thoughts are shown dimmed on stderr, never on stdout.")
    ] = False,
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option("--max-new-tokens", "-n", min=1,
                     help="Most tokens to return. Whole canvases are generated; the answer is cut to this. "
                          "[default: from the checkpoint, 256]", show_default=False),
    ] = None,
    steps: Annotated[
        Optional[int],
        typer.Option("--steps", min=1, help="Most denoising steps per canvas. [default: from the checkpoint, 48]",
                     show_default=False),
    ] = None,
    entropy_bound: Annotated[
        Optional[float],
        typer.Option("--entropy-bound",
                     help="Entropy budget (nats) for accepting tokens per step; higher accepts more. [default: 0.1]",
                     show_default=False),
    ] = None,
    t_min: Annotated[
        Optional[float], typer.Option("--t-min", min=0, help="Temperature at the last step. [default: 0.4]",
                                      show_default=False)
    ] = None,
    t_max: Annotated[
        Optional[float], typer.Option("--t-max", min=0, help="Temperature at the first step. [default: 0.8]",
                                      show_default=False)
    ] = None,
    stability: Annotated[
        Optional[int],
        typer.Option("--stability", min=0, help="Adaptive stop: steps the draft must stay unchanged. [default: 1]",
                     show_default=False),
    ] = None,
    confidence: Annotated[
        Optional[float],
        typer.Option("--confidence",
                     help="Adaptive stop: mean token entropy (nats) must fall below this. [default: 0.005]",
                     show_default=False),
    ] = None,
    seed: Annotated[
        Optional[int],
        typer.Option("--seed", min=0, help="Random seed (torch.manual_seed); same seed, same answer on the same "
                                           "machine. [default: random, reported by --json]", show_default=False),
    ] = None,
    device: DeviceOption = "auto",
    offline: OfflineOption = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print one line of timing and step stats on stderr.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the text.")] = False,
    show_steps: Annotated[
        bool,
        typer.Option("--show-steps", help="Watch the denoising live on stderr (one plain line per step when stderr "
                                          "is not a terminal). stdout is unchanged."),
    ] = False,
    trace_file: Annotated[
        Optional[Path],
        typer.Option("--trace", dir_okay=False, help="Write a JSONL trace of every step, for `diffgen replay`."),
    ] = None,
) -> None:
    """Generate an answer to PROMPT (and/or stdin) and print it on stdout."""
    with error_funnel():
        from diffgen import prompt as prompt_mod

        composed = prompt_mod.compose(prompt, prompt_mod.read_stdin(sys.stdin), file or ())
        for warning in composed.warnings:
            typer.echo(f"diffgen: warning: {warning}", err=True)

        from diffgen import loader, plan, render

        console = render.error_console()
        checkpoint = loader.resolve(model, offline=offline)
        defaults = loader.read_defaults(checkpoint.path, loader.inspect_checkpoint(checkpoint.path, model))
        settings = defaults.replace(
            max_new_tokens=max_new_tokens,
            max_denoising_steps=steps,
            entropy_bound=entropy_bound,
            t_min=t_min,
            t_max=t_max,
            stability_threshold=stability,
            confidence_threshold=confidence,
            seed=seed if seed is not None else secrets.randbelow(2**31),
        )
        load_plan = plan.simple_plan(device)
        if console.is_terminal:
            console.print(f"Loading {model} on {load_plan.describe()}", style="dim", markup=False)
        loaded = loader.load_checkpoint(checkpoint, load_plan, progress=console.is_terminal)

        from diffgen import generate

        ids = prompt_mod.encode(loaded.tokenizer, composed.text, system=system, think=think, raw=raw)
        if show_steps or trace_file is not None:
            result = _observed(loaded, ids, settings, console, show_steps=show_steps, trace_file=trace_file,
                               model=model, prompt=composed.text)
        else:
            with _status(console, "Denoising"):
                result = generate.generate(loaded, [ids], settings)
        completion = result.completions[0]

        if json_output:
            render.write_json(render.completion_record(completion, result, model=model), sys.stdout)
        else:
            if think and completion.thoughts and not show_steps:
                render.show_thoughts(completion.thoughts, console)
            render.write_answer(completion, sys.stdout)
        if stats:
            typer.echo(render.stats_line(completion), err=True)


def _observed(loaded, ids, settings, console, *, show_steps: bool, trace_file: Optional[Path], model: str,
              prompt: str):
    """Run a generation whose steps feed the live view and/or a trace file; return its result."""
    import dataclasses

    from diffgen import generate, render, trace, view

    generation = generate.stream(loaded, [ids], settings, observe=True)
    texts = trace.TokenTexts(loaded.tokenizer)
    with contextlib.ExitStack() as stack:
        sinks = []
        writer = None
        if trace_file is not None:
            try:
                handle = stack.enter_context(open(trace_file, "w", encoding="utf-8"))
            except OSError as exc:
                from diffgen.errors import UsageError

                raise UsageError(f"cannot write --trace {trace_file}: {exc.strerror or exc}") from exc
            writer = trace.TraceWriter(handle)
            writer.header(model=model, prompt=prompt, settings=settings.to_dict(),
                          canvas_length=generation.canvas_length, channel_ids=texts.channel_ids)
            sinks.append(writer)
        if show_steps:
            sinks.append(stack.enter_context(view.step_view(console, texts.channel_ids, sys.stderr)))
        for record in trace.records(generation, texts):
            for sink in sinks:
                sink.update(record)
        result = generation.result
        if writer is not None:
            completion = result.completions[0]
            writer.result({"text": completion.text, "thoughts": completion.thoughts,
                           "finish_reason": completion.finish_reason,
                           "stats": dataclasses.asdict(completion.stats)})
    return result


REPLAY_EPILOG = (
    "Examples:\n\n"
    '  diffgen run --trace run.jsonl "Why is the sky blue?"\n\n'
    "  diffgen replay run.jsonl --speed 0.25          (four times slower than it ran)\n\n"
    "  diffgen replay run.jsonl --svg run.svg --html run.html"
)


@app.command(epilog=REPLAY_EPILOG)
def replay(
    file: Annotated[Path, typer.Argument(help="A trace written by `diffgen run --trace`.", dir_okay=False)],
    speed: Annotated[float, typer.Option("--speed", min=0, help="Playback speed; 0 plays without pauses.")] = 1.0,
    svg: Annotated[
        Optional[Path], typer.Option("--svg", dir_okay=False, help="Write a picture of the run as SVG instead.")
    ] = None,
    html: Annotated[
        Optional[Path], typer.Option("--html", dir_okay=False, help="Write a picture of the run as HTML instead.")
    ] = None,
) -> None:
    """Re-draw a traced run without a model, or export a picture of when each token settled."""
    with error_funnel():
        import time

        from diffgen import render, trace, view

        recorded = trace.read_trace(file)
        if svg is not None or html is not None:
            from diffgen import picture

            for path in picture.export(recorded, svg=svg, html=html):
                typer.echo(f"wrote {path}", err=True)
            return
        console = render.error_console()
        with view.step_view(console, recorded.channel_ids, sys.stderr) as shown:
            clock = 0.0
            for record in recorded.records:
                if speed > 0:
                    time.sleep(min(max(record.elapsed - clock, 0.0) / speed, 2.0))
                clock = record.elapsed
                shown.update(record)
        if recorded.result is not None:
            sys.stdout.write(recorded.result["text"] + "\n")
            sys.stdout.flush()


@contextlib.contextmanager
def _status(console, message: str) -> Iterator[None]:
    """A spinner on stderr while ``message`` runs, only when stderr is a terminal."""
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C before a command's own funnel took over
        typer.echo("diffgen: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
