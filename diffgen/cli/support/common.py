"""What the commands share besides their options (:mod:`diffgen.cli.support.options`): loading with a
plan line, a spinner, input files and output paths.

Only light modules are imported here, so building the CLI (``--help``, completion) stays fast.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from diffgen.cli.support.funnel import doing
from diffgen.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedTokenizerBase

    from diffgen.denoise.constrained.edit import EditResult
    from diffgen.denoise.constrained.fill import FillResult
    from diffgen.denoise.events import Event
    from diffgen.images import Picture, VisionInputs
    from diffgen.loading.loader import LoadedModel
    from diffgen.loading.prepare import Prepared
    from diffgen.records.trace import Record, TokenTexts, TraceWriter
    from diffgen.settings import GenerationSettings

    Laid = FillResult | EditResult  # what a laid-out generation (fill, edit) returns


def exclusive(ctx: Optional[typer.Context], hint: str, **options: Any) -> tuple[Any, ...]:
    """The values of options that exclude each other (in the order given), once checked.

    Two of them set on the command line (or in the environment) is a usage error; one set there
    overrides the others when those come from the config file, as a flag overrides any default.
    """
    on = [name for name, value in options.items() if value]
    if len(on) < 2:
        return tuple(options.values())
    explicit = [name for name in on if parameter_source(ctx, name) not in ("DEFAULT", "DEFAULT_MAP")]
    if len(explicit) == 1:  # the flag wins over the config file's conflicting defaults
        return tuple(value if name == explicit[0] else (False if isinstance(value, bool) else None)
                     for name, value in options.items())
    names = " and ".join(f"--{name.replace('_', '-')}" for name in (explicit or on)[:2])
    where = "" if explicit else " (both set in the config file)"
    raise UsageError(f"{names} exclude each other{where}", hint)


def parameter_source(ctx: Optional[typer.Context], name: str) -> Optional[str]:
    """Where a parameter's value came from: ``COMMANDLINE``, ``ENVIRONMENT``, ``DEFAULT_MAP`` (the
    config file) or ``DEFAULT``; ``None`` when unknown."""
    try:
        return ctx.get_parameter_source(name).name
    except Exception:  # noqa: BLE001 - no context (a library call) or no such parameter: treat as explicit
        return None


def check_output_path(path: Optional[Path], flag: str, *, inputs: Any = (), overwrite: bool = False,
                      ours: Optional[Callable[[Path], bool]] = None, kind: str = "a file diffgen wrote") -> None:
    """Refuse, before anything is loaded, an output file that could not be written or that would
    destroy a user's file (:mod:`diffgen.outputs`: never an input, never an existing file that is not
    ``kind`` unless ``overwrite``)."""
    from diffgen import outputs

    outputs.check(path, flag, inputs=_paths(inputs), ours=ours, kind=kind, overwrite=overwrite)


def check_trace_path(path: Optional[Path], *, inputs: Any = (), overwrite: bool = False) -> None:
    """``--trace``: a new file, an existing diffgen trace, or (with ``--overwrite``) any file that
    is not an input of the command."""
    if path is None:
        return

    def is_trace(candidate: Path) -> bool:
        from diffgen.records.trace import is_trace as recognise

        return recognise(candidate)

    check_output_path(path, "--trace", inputs=inputs, overwrite=overwrite, ours=is_trace, kind="a diffgen trace")


def _paths(inputs: Any) -> list[Any]:
    out: list[Any] = []
    for item in inputs or ():
        if item is None:
            continue
        if isinstance(item, (list, tuple)):
            out += [part for part in item if part is not None]
        else:
            out.append(item)
    return out


def load_model(prepared: Prepared, console: Console, *, quiet: bool = False,
               tokenizer: Optional[PreTrainedTokenizerBase] = None) -> LoadedModel:
    """Say the plan in one line on stderr, then load (progress bar on a terminal)."""
    from diffgen.loading.prepare import load_prepared
    from diffgen.planning.sizes import human

    load_plan, chosen = prepared.plan, prepared.chosen
    if not quiet:
        typer.echo(f"diffgen: plan: {prepared.checkpoint.name} as {load_plan.describe()} — {human(chosen.weights)} "
                   f"weights + {human(chosen.runtime)} runtime, {human(prepared.budget)} usable", err=True)
    if load_plan.offload_bytes:
        typer.echo(f"diffgen: warning: {human(load_plan.offload_bytes)} of layers offloaded to the CPU; every "
                   "denoising step streams them over PCIe, so expect generation to be many times slower", err=True)
    with doing("loading the weights"):
        return load_prepared(prepared, progress=console.is_terminal and not quiet, tokenizer=tokenizer)


@contextlib.contextmanager
def status(console: Console, message: str, *, quiet: bool = False) -> Iterator[Optional[Callable[[str], None]]]:
    """A spinner on stderr while ``message`` runs, only when stderr is a terminal.

    Yields a function that names the current phase in the spinner (``None`` without a spinner).
    """
    if console.is_terminal and not quiet:
        with console.status(message) as spinner:
            yield lambda phase: spinner.update(f"{message}: {phase}")
    else:
        yield None


def read_input(path: str) -> tuple[bytes, str]:
    """The bytes of a file, or of stdin for ``-``; and a name for messages."""
    if path == "-":
        return sys.stdin.buffer.read(), "stdin"
    try:
        return Path(path).read_bytes(), path
    except OSError as exc:
        from diffgen.errors import UsageError

        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc


class Observer:
    """Feeds a run's events (``run``, ``fill``, ``edit``) to the live view and/or a trace file.

    ``on_event`` takes each loop event; :meth:`finish` writes the trace's result line.
    """

    def __init__(self, sinks: list[Any], writer: Optional[TraceWriter], texts: Optional[TokenTexts]):
        self.sinks, self.writer, self.texts = sinks, writer, texts
        #: the trace's write error (a full disk): the command raises it once the answer is out
        self.failure: Optional[BaseException] = None

    def on_event(self, event: Event) -> None:
        from diffgen.records import trace

        for record in trace.records([event], self.texts):
            self.on_record(record)

    def on_record(self, record: Record) -> None:
        """One host record (a step or committed canvas), e.g. rebuilt from a server's stream."""
        for sink in self.sinks:
            sink.update(record)

    def finish(self, text: str, stats: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.result({"text": text, "thoughts": "", "finish_reason": "length", "stats": stats})


@contextlib.contextmanager
def observing(console: Console, tokenizer: Optional[PreTrainedTokenizerBase], *, show_steps: bool,
              trace_file: Optional[Path], model: str, prompt: str, settings: GenerationSettings | dict[str, Any],
              canvas_length: int,
              channel_ids: Optional[tuple[int, int]] = None) -> Iterator[Optional[Observer]]:
    """An :class:`Observer` for ``--show-steps`` / ``--trace`` (``None`` when neither is asked for).

    ``tokenizer`` ``None`` (a run on a server, whose records come with their texts): the thought
    channel's ids are ``channel_ids``; ``settings`` may then be the settings' dict."""
    if not show_steps and trace_file is None:
        yield None
        return
    from diffgen.records import trace
    from diffgen.ui import view

    texts = trace.TokenTexts(tokenizer) if tokenizer is not None else None
    channel_ids = texts.channel_ids if texts is not None else channel_ids
    with contextlib.ExitStack() as stack:
        sinks: list[Any] = []
        writer = None
        if trace_file is not None:
            from diffgen import outputs

            # Written beside the file and renamed into place once complete; a write that fails
            # (a full disk) stops the trace, not the run: the answer is still printed.
            atomic = stack.enter_context(outputs.AtomicFile(trace_file, "--trace"))
            writer = trace.TraceWriter(atomic.file)
            writer.header(model=model, prompt=prompt, settings=settings if isinstance(settings, dict) else
                          settings.to_dict(), canvas_length=canvas_length, channel_ids=channel_ids)
            sinks.append(writer)
        if show_steps:
            sinks.append(stack.enter_context(view.step_view(console, channel_ids, sys.stderr)))
        observer = Observer(sinks, writer, texts)
        yield observer
        if writer is not None and writer.failure is not None:
            observer.failure = outputs.output_error(trace_file, writer.failure, "--trace")
            atomic.discard()  # the old file (if any) stays as it was


def read_images(paths: Optional[list[str]], prompt: Optional[str], what: str = "the prompt"
                ) -> tuple[list[Picture], bool]:
    """``--image`` files read and checked before anything is planned or loaded; ``-`` reads one
    image from stdin, which needs the prompt as an argument. Returns the pictures and whether
    stdin was taken by an image."""
    if not paths:
        return [], False
    from diffgen import images

    if paths.count("-") > 1:
        raise UsageError("--image - reads stdin once", "pass - at most once")
    if "-" in paths and (prompt is None or prompt == "-"):
        raise UsageError(f"--image - reads the image from stdin, so {what} must be an argument",
                         'e.g. cat photo.png | diffgen run --image - "What is in this picture?"')
    pictures = []
    with doing("reading the images"):
        for path in paths:
            if path == "-":
                images.require_pillow()
                pictures.append(images.read_image(sys.stdin.buffer.read(), "the image on stdin"))
            else:
                pictures.append(images.read_image_file(path))
    return pictures, "-" in paths


def encode_with_images(prepared: Prepared, tokenizer: PreTrainedTokenizerBase, text: str, pictures: list[Picture], *,
                       system: Optional[str], think: bool, settings: Optional[GenerationSettings] = None
                       ) -> tuple[list[int], Optional[VisionInputs]]:
    """Token ids and image inputs through transformers' processor, the context checked before
    the weights load (the images' soft tokens count against it) for ``settings`` (the prepared
    ones by default)."""
    from diffgen import images
    from diffgen.denoise import loop

    with doing("preprocessing the images"):
        processor = images.load_processor(prepared.checkpoint.path, tokenizer, prepared.config)
        ids, vision = images.encode(processor, text, pictures, system=system, think=think)
        images.check_positions(vision, prepared.config, pictures)
    settings = settings or prepared.settings
    text_config = prepared.config.get("text_config", prepared.config)
    canvas = int(prepared.config.get("canvas_length", 256))
    canvases = -(-settings.max_new_tokens // canvas)
    images.check_image_context(vision, len(ids), text_config.get("max_position_embeddings"), canvases * canvas)
    loop.check_context_config(prepared.config, len(ids), settings)
    return ids, vision


def refuse_local_only(ctx: Optional[typer.Context], flags: dict[str, str], where: str = "--server") -> None:
    """With ``--server``, a usage error for a flag that only a local run uses (``flags``: parameter
    name -> flag as written), when it was given on the command line or in the environment (a
    config file's defaults for local runs are not an error)."""
    for name, flag in flags.items():
        if parameter_source(ctx, name) in ("COMMANDLINE", "ENVIRONMENT"):
            raise UsageError(f"{flag} only applies to a model loaded here, not to one behind {where}",
                             f"drop {flag} (the server decides how it runs the model), or drop {where} to run here")


def check_new_tokens(prepared: Prepared, flag: str = "--max-new-tokens") -> None:
    """Refuse, before the weights are read, a token budget that no prompt could fit: its whole
    canvases alone run past the model's context (a prompt's own check comes once it is tokenised)."""
    config = prepared.config
    limit = config.get("text_config", config).get("max_position_embeddings")
    canvas = int(config.get("canvas_length", 256))
    wanted = prepared.settings.max_new_tokens
    need = -(-wanted // canvas) * canvas
    if limit and need >= int(limit):
        most = (int(limit) - 1) // canvas * canvas
        raise UsageError(f"{flag} {wanted} needs {need:,} positions in whole canvases of {canvas}, more than the "
                         f"model's context of {int(limit):,}", f"lower {flag} (at most {most:,} leaves room for a prompt)")


def prepare_generation(model: str, *, seed: Optional[int], flags: dict[str, Any], quiet: bool = False,
                       **load: Any) -> Prepared:
    """``prepare()`` with the sampler flags and a seed (a fresh random one when none was given),
    named for the error funnel."""
    import secrets

    from diffgen.loading.prepare import prepare

    with doing("planning the load"):
        prepared = prepare(model, **load, **flags, seed=seed if seed is not None else secrets.randbelow(2**31))
    offload_note(prepared, bool(load.get("offload")), quiet=quiet)
    return prepared


def offload_note(prepared: Prepared, offload: bool, *, quiet: bool = False) -> None:
    """``--offload`` on the CPU moves nothing: say so rather than ignore the flag silently."""
    if offload and prepared.plan.device == "cpu" and not quiet:
        typer.echo("diffgen: warning: --offload has no effect: the model runs on the CPU, where every layer already "
                   "is (it moves layers off a GPU)", err=True)


def denoise_laid_out(console: Console, tokenizer: PreTrainedTokenizerBase,
                     run: Callable[[Optional[Callable[[Event], None]]], Laid], *, phase: str, show_steps: bool,
                     trace_file: Optional[Path], model: str, prompt: str, settings: GenerationSettings,
                     canvas_length: int, quiet: bool) -> tuple[Laid, Optional[BaseException]]:
    """Run a laid-out generation (``fill``, ``edit``): ``run(on_event)`` returns its result, whose
    events feed ``--show-steps`` / ``--trace`` when asked for. Returns the result and the trace's
    write error (``None`` when it was written), to raise once the answer is out."""
    with doing(phase):
        with observing(console, tokenizer, show_steps=show_steps, trace_file=trace_file, model=model,
                       prompt=prompt, settings=settings, canvas_length=canvas_length) as observer:
            with status(console, "Denoising", quiet=quiet or show_steps):
                result = run(observer.on_event if observer else None)
            if observer is not None:
                observer.finish(result.text, {"steps_per_canvas": list(result.steps_per_canvas),
                                              "seconds": result.seconds})
    return result, (observer.failure if observer is not None else None)
