"""``diffgen bench``: fixed-step timing, optionally side by side with transformers' generate()."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any, Literal, Optional

import typer

from diffgen.cli.support.common import exclusive, parameter_source, status
from diffgen.cli.support.funnel import doing
from diffgen.cli.support.options import (
    CompileOption,
    DeviceOption,
    ExactOption,
    FastOption,
    MaxMemoryOption,
    NoColorOption,
    OfflineOption,
    QuantOption,
    complete_model,
    sampler_choice,
)
from diffgen.denoise.options import Execution

EPILOG = (
    "Examples:\n\n"
    "  diffgen bench --random-config ./tiny/config.json --compare-reference   (CPU, seconds)\n\n"
    "  diffgen bench --random-config real --steps 16 --json            (GPU, random weights of the real size)\n\n"
    "  diffgen bench -m google/diffusiongemma-26B-A4B-it --quant fp8 --batch 8\n\n"
    "Adaptive stopping is off: every canvas runs exactly --steps steps. The first call is timed apart. "
    "Progress goes to stderr (a spinner on a terminal, else one line per phase); the numbers to stdout."
)


def bench(
    ctx: typer.Context,
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", envvar="DIFFGEN_MODEL", show_envvar=True, autocompletion=complete_model,
                     show_default=False, help="A checkpoint to time (Hub id or directory); or use --random-config."),
    ] = None,
    random_config: Annotated[
        Optional[str], typer.Option("--random-config", help="real, or the path of a config.json: random weights of those dimensions, no checkpoint needed.",
                                    show_default=False)
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Denoising steps per canvas.")] = 16,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length.")] = 64,
    canvases: Annotated[int, typer.Option("--canvases", min=1, help="Canvases per generation.")] = 2,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Rows generated together.")] = 1,
    reps: Annotated[int, typer.Option("--reps", min=1, help="Timed runs after the warm-up.")] = 3,
    exact: ExactOption = False,
    fast: FastOption = False,
    compile: CompileOption = False,
    compare_reference: Annotated[
        bool, typer.Option("--compare-reference", help="Also time transformers' generate() in the same process.")
    ] = False,
    reference_cache: Annotated[
        Literal["dynamic", "static"],
        typer.Option("--reference-cache", help="dynamic (eager) or static (transformers compiles the step; "
                                               "its first call is slow).")
    ] = "dynamic",
    quant: QuantOption = "auto",
    max_memory: MaxMemoryOption = None,
    device: DeviceOption = "auto",
    offline: OfflineOption = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    no_color: NoColorOption = False,
) -> None:
    """Time the denoising loop with a fixed number of steps and print the numbers."""
    from diffgen.errors import UsageError

    if random_config is not None and model is not None:
        if parameter_source(ctx, "model") in ("ENVIRONMENT", "DEFAULT_MAP"):  # a default: --random-config wins
            model = None
        else:
            raise UsageError("give exactly one of --model and --random-config")
    if model is None and random_config is None:
        raise UsageError("give exactly one of --model and --random-config",
                         "e.g. diffgen bench --random-config real, or set DIFFGEN_MODEL")
    exact, fast = exclusive(ctx, "give one of them, or neither for the device's default", exact=exact, fast=fast)
    execution = Execution(exact=sampler_choice(exact, fast, compile), compile=compile)
    from diffgen.ui import render

    console = render.error_console()
    say = _phases(console)
    if random_config is not None:
        from diffgen.denoise import bench as bench_mod
        from diffgen.loading.prepare import plan_load

        say(f"building a random model ({random_config})")
        with doing("building the random model"):
            config = bench_mod.random_config(random_config).to_dict()
            plan, _, _ = plan_load(config, device=device, quant=quant, max_memory=max_memory, offload=False,
                                   batch=batch)
            loaded = bench_mod.random_model(random_config, plan)
    else:
        from diffgen.cli.support.common import load_model
        from diffgen.denoise import bench as bench_mod
        from diffgen.loading.prepare import prepare

        with doing("planning the load"):
            prepared = prepare(model, offline=offline, device=device, quant=quant, max_memory=max_memory, batch=batch)
        say(f"loading {model}")
        loaded = load_model(prepared, console)
    with doing("timing the denoising loop"), status(console, "Benchmarking") as show:
        result = bench_mod.run(loaded, steps=steps, prompt_tokens=prompt_tokens, canvases=canvases, batch=batch,
                               execution=execution, compare_reference=compare_reference, reps=reps,
                               reference_cache=reference_cache, progress=show or say)
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(bench_mod.table(result) + "\n")


def _phases(console: Any) -> Any:
    """One plain ``diffgen: bench: <phase>`` line per phase on stderr (the spinner replaces it on a terminal)."""
    start = time.perf_counter()

    def say(phase: str) -> None:
        if not console.is_terminal:
            typer.echo(f"diffgen: bench: {phase} ({time.perf_counter() - start:.1f} s)", err=True)

    return say
