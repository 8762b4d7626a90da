"""``diffgen bench``: fixed-step timing, optionally side by side with transformers' generate()."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from diffgen.cli.common import DeviceOption, MaxMemoryOption, OfflineOption, QuantOption, complete_model, \
    error_funnel

EPILOG = (
    "Examples:\n\n"
    "  diffgen bench --random-config ./tiny/config.json --compare-reference   (CPU, seconds)\n\n"
    "  diffgen bench --random-config real --steps 16 --json            (GPU, random weights of the real size)\n\n"
    "  diffgen bench -m google/diffusiongemma-26B-A4B-it --quant fp8 --batch 8\n\n"
    "Adaptive stopping is off: every canvas runs exactly --steps steps. The first call is timed apart."
)


def bench(
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", autocompletion=complete_model, show_default=False,
                     help="A checkpoint to time (Hub id or directory); or use --random-config."),
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
    exact: Annotated[
        Optional[bool], typer.Option("--exact/--fast", help="Sampler. [default: exact on the CPU, fast elsewhere]",
                                     show_default=False)
    ] = None,
    compare_reference: Annotated[
        bool, typer.Option("--compare-reference", help="Also time transformers' generate() in the same process.")
    ] = False,
    reference_cache: Annotated[
        str, typer.Option("--reference-cache", help="dynamic (eager) or static (transformers compiles the step; "
                                                    "its first call is slow).")
    ] = "dynamic",
    quant: QuantOption = "auto",
    max_memory: MaxMemoryOption = None,
    device: DeviceOption = "auto",
    offline: OfflineOption = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time the denoising loop with a fixed number of steps and print the numbers."""
    from diffgen.errors import UsageError

    with error_funnel():
        if (model is None) == (random_config is None):
            raise UsageError("give exactly one of --model and --random-config")
        from diffgen.denoise import bench as bench_mod
        from diffgen.ui import render

        console = render.error_console()
        if random_config is not None:
            from diffgen.loading.prepare import plan_load

            config = bench_mod.random_config(random_config).to_dict()
            plan, _, _ = plan_load(config, device=device, quant=quant, max_memory=max_memory, offload=False,
                                   batch=batch)
            loaded = bench_mod.random_model(random_config, plan)
        else:
            from diffgen.cli.common import load_model
            from diffgen.loading.prepare import prepare

            prepared = prepare(model, offline=offline, device=device, quant=quant, max_memory=max_memory, batch=batch)
            loaded = load_model(prepared, console)
        result = bench_mod.run(loaded, steps=steps, prompt_tokens=prompt_tokens, canvases=canvases, batch=batch,
                               exact=exact, compare_reference=compare_reference, reps=reps,
                               reference_cache=reference_cache)
        if json_output:
            sys.stdout.write(json.dumps(result) + "\n")
        else:
            sys.stdout.write(bench_mod.table(result) + "\n")
