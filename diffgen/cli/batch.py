"""``diffgen batch``: many prompts, batched on the model, one JSONL record each, nothing lost."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffgen.loading.prepare import auto_batch_rows, prepare
from diffgen.cli.common import (
    DEFAULT_MODEL,
    ConfidenceOption,
    DeviceOption,
    EntropyBoundOption,
    MaxMemoryOption,
    MaxNewTokensOption,
    ModelOption,
    OffloadOption,
    OfflineOption,
    QuantOption,
    RawOption,
    StabilityOption,
    StepsOption,
    SystemOption,
    ThinkOption,
    TMaxOption,
    TMinOption,
    error_funnel,
    load_model,
    sampler_flags,
    read_input,
)
from diffgen.cli.options import NoColorOption


EPILOG = (
    "Examples:\n\n"
    "  diffgen batch prompts.txt -o answers.jsonl           (one prompt per line; ids are line numbers)\n\n"
    "  diffgen batch jobs.jsonl -o out.jsonl --batch-size 16 --seed 7\n\n"
    "  diffgen batch jobs.jsonl -o out.jsonl --resume       (after Ctrl-C or a crash: finish the rest)\n\n"
    "  cat jobs.jsonl | diffgen batch - > out.jsonl\n\n"
    'JSONL records: {"id": ..., "prompt": ...} plus optional system, think, raw, seed, max_new_tokens, steps, '
    "entropy_bound, t_min, t_max, stability, confidence. Output records: id, line, text, tokens, finish_reason, "
    "stats (or error). Exit status 1 when any record failed."
)


def batch(
    input_path: Annotated[str, typer.Argument(metavar="INPUT", help="JSONL or text file of prompts; - for stdin.")],
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", dir_okay=False, help="JSONL file to append records to. [default: stdout]",
                     show_default=False),
    ] = None,
    batch_size: Annotated[
        str, typer.Option("--batch-size", help="Records generated together: N, or auto (the most rows the memory "
                                               "plan fits, up to 32).")
    ] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Skip ids already in OUTPUT; append the rest.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUTPUT.")] = False,
    input_format: Annotated[
        str, typer.Option("--format", help="auto, jsonl or text. auto: JSONL if the first line is an object.")
    ] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
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
    no_color: NoColorOption = False,
) -> None:
    """Generate an answer for every prompt in INPUT, writing one JSONL record per prompt."""
    size = _batch_size(batch_size)  # None: auto, decided from the memory plan once the checkpoint is known
    if input_format not in ("auto", "jsonl", "text"):
        raise typer.BadParameter("use auto, jsonl or text", param_hint="--format")
    with error_funnel("interrupted; finished records are in the output — rerun with --resume to do the rest"):
        from diffgen.records import batch as batch_mod
        from diffgen import prompt as prompt_mod
        from diffgen.ui import render

        data, name = read_input(input_path)
        text, warning = prompt_mod.decode_input(data, name)
        if warning:
            typer.echo(f"diffgen: warning: {warning}", err=True)
        items = list(batch_mod.parse(text.splitlines(), input_format, name))
        console = render.error_console()
        prepared = prepare(
            model, offline=offline, device=device, quant=quant, max_memory=max_memory, offload=offload,
            batch=size or 1,
            **sampler_flags(max_new_tokens, steps, entropy_bound, t_min, t_max, stability, confidence),
        )
        defaults = prepared.settings
        out = batch_mod.Output(output, resume=resume, overwrite=overwrite, stdout=sys.stdout)
        try:
            if not items:
                if not quiet:
                    typer.echo("diffgen: no prompts in the input", err=True)
                return
            if size is None:
                size = auto_batch_rows(prepared)
                if not quiet:
                    typer.echo(f"diffgen: batch size {size} (auto, from the memory plan)", err=True)
            loaded = load_model(prepared, console, quiet=quiet)
            summary = _run(batch_mod, items, loaded, defaults, seed, size, out, console, model,
                           system=system, raw=raw, think=think, show=not quiet)
        finally:
            out.close()
        if summary.failed:
            for failure in summary.failures[:5]:
                typer.echo(f"diffgen: failed: {failure}", err=True)
            if len(summary.failures) > 5:
                typer.echo(f"diffgen: ... and {len(summary.failures) - 5} more (see the error records)", err=True)
            raise typer.Exit(1)


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise typer.BadParameter("use a positive integer or auto", param_hint="--batch-size")


def _run(batch_mod: Any, items: list, loaded: Any, defaults: Any, base_seed: int, size: int, out: Any,
         console: Any, model: str, *, system: Optional[str], raw: bool, think: bool, show: bool) -> Any:
    from diffgen.denoise import loop as generate
    from diffgen.ui import render
    from diffgen import prompt as prompt_mod

    def encode(job: Any, settings: Any) -> list[int]:
        ids = prompt_mod.encode(loaded.tokenizer, job.prompt, system=job.system or system,
                                think=job.think or think, raw=job.raw or raw)
        generate.check_context(loaded.model, len(ids), settings)
        return ids

    def generate_batch(prompts: list[list[int]], settings: Any, seeds: list[int]) -> list[dict]:
        result = generate.generate(loaded, prompts, settings, seeds=seeds)
        return [render.completion_record(c, result, model=model, seed=s) for c, s in zip(result.completions, seeds)]

    start = time.perf_counter()
    progress = _Progress(console) if show and console.is_terminal else None
    try:
        summary = batch_mod.run(items, encode=encode, generate_batch=generate_batch, defaults=defaults,
                                base_seed=base_seed, batch_size=size, output=out,
                                progress=progress.update if progress else lambda summary, tokens: None)
    finally:
        if progress:
            progress.stop()
    if show:
        elapsed = time.perf_counter() - start
        typer.echo(
            f"diffgen: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped of {summary.total} "
            f"records in {elapsed:.1f} s ({summary.done / elapsed if elapsed else 0:.2f} records/s, "
            f"{summary.tokens / elapsed if elapsed else 0:.1f} tokens/s)",
            err=True,
        )
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
