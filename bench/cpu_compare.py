"""CPU time per denoising step, five ways side by side in one process, interleaved.

diffgen's exact loop (token-identical to generate()), its fast step eager and compiled
(``torch.compile`` of the whole step), and transformers' ``generate()`` eager and compiled
with a static cache (``cache_implementation="static"``). Adaptive stopping is off, so every
canvas runs the same number of steps. First calls (compilation) are reported apart.

    python bench/cpu_compare.py [--canvas-length 16] [--steps 16] [--canvases 2] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canvas-length", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    import transformers

    from devtools.tiny import save_tiny_checkpoint
    from diffgen.denoise.loop import Execution, generate
    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan
    from diffgen.prompt import encode

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_checkpoint(f"{tmp}/tiny", canvas_length=args.canvas_length, vocab_size=args.vocab_size)
        loaded = load(str(path), LoadPlan("cpu", "float32"), progress=False)
    canvas = loaded.model.config.canvas_length
    ids = encode(loaded.tokenizer, "Why is the sky blue? Explain it to a ten-year-old.")
    steps = args.steps * args.canvases
    settings = replace(loaded.defaults.replace(max_new_tokens=canvas * args.canvases, max_denoising_steps=args.steps,
                                               seed=0), stability_threshold=None, confidence_threshold=None)

    def ours(exact: bool, compile: bool = False) -> float:
        start = time.perf_counter()
        generate(loaded, [ids], settings, execution=Execution(exact=exact, compile=compile))
        return (time.perf_counter() - start) / steps

    def reference(static: bool) -> float:
        torch.manual_seed(0)
        start = time.perf_counter()
        extra = {"cache_implementation": "static"} if static else {}
        loaded.model.generate(torch.tensor([ids]), max_new_tokens=canvas * args.canvases,
                              max_denoising_steps=args.steps, stability_threshold=None, confidence_threshold=None,
                              **extra)
        return (time.perf_counter() - start) / steps

    runs = {
        "diffgen exact (eager)": lambda: ours(True),
        "diffgen fast (eager)": lambda: ours(False),
        "diffgen fast (compiled step)": lambda: ours(False, compile=True),
        "transformers generate() eager": lambda: reference(False),
        "transformers generate() compiled static": lambda: reference(True),
    }
    first = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        first[name] = time.perf_counter() - start
        print(f"first call {name}: {first[name]:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            times[name].append(run())

    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s); "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: {params / 1e6:.2f}M parameters, vocabulary {args.vocab_size}, canvas {canvas}, "
          f"{args.canvases} canvases x {args.steps} steps, prompt {len(ids)} tokens, batch 1, fp32, "
          f"median of {args.reps} interleaved runs")
    compiled_ref = statistics.median(times["transformers generate() compiled static"])
    print(f"{'generator':<42}{'ms/step':>9}{'vs compiled ref':>17}{'first call s':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<42}{median * 1e3:>9.2f}{median / compiled_ref:>17.2f}{first[name]:>14.1f}")


if __name__ == "__main__":
    main()
