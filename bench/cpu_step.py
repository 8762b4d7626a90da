"""CPU time per denoising step: diffgen's loop vs transformers' own generate(), same process.

Builds a tiny random checkpoint (or uses --model DIR), then times both generators on the
same prompt with a fixed number of steps (adaptive stopping off in both), interleaving the
runs so that neither gets a warmer machine. Prints a table of median ms per step.

    python bench/cpu_step.py [--model DIR] [--steps 16] [--canvases 2] [--reps 7] [--canvas-length 16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import replace
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: a fresh tiny random one)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--canvas-length", type=int, default=16)
    args = parser.parse_args()

    import torch
    import transformers

    from diffgen.denoise.loop import generate
    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan
    from diffgen.prompt import encode
    from devtools.tiny import save_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(save_tiny_checkpoint(f"{tmp}/tiny", canvas_length=args.canvas_length))
        loaded = load(path, LoadPlan("cpu", "float32"), progress=False)
        canvas = loaded.model.config.canvas_length
        ids = encode(loaded.tokenizer, "Why is the sky blue? Explain it to a ten-year-old.")
        settings = replace(
            loaded.defaults.replace(max_new_tokens=canvas * args.canvases, max_denoising_steps=args.steps, seed=0),
            stability_threshold=None,
            confidence_threshold=None,
        )
        input_ids = torch.tensor([ids])

        def run_diffgen() -> float:
            start = time.perf_counter()
            result = generate(loaded, [ids], settings)
            elapsed = time.perf_counter() - start
            return elapsed / sum(result.completions[0].stats.steps_per_canvas)

        def run_reference() -> float:
            torch.manual_seed(0)
            start = time.perf_counter()
            out = loaded.model.generate(
                input_ids, max_new_tokens=settings.max_new_tokens, max_denoising_steps=args.steps,
                stability_threshold=None, confidence_threshold=None,
            )
            elapsed = time.perf_counter() - start
            canvases_run = (out.sequences.shape[1] - input_ids.shape[1]) // canvas
            return elapsed / (args.steps * canvases_run)

        run_diffgen(), run_reference()  # warm-up
        ours, theirs = [], []
        for _ in range(args.reps):
            ours.append(run_diffgen())
            theirs.append(run_reference())

    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: {params / 1e6:.2f}M parameters, canvas {canvas}, {args.canvases} canvases x {args.steps} steps, "
          f"prompt {len(ids)} tokens, batch 1, fp32, median of {args.reps}")
    print(f"{'generator':<34}{'ms/step':>10}")
    print(f"{'diffgen (exact loop)':<34}{statistics.median(ours) * 1e3:>10.2f}")
    print(f"{'transformers generate() eager':<34}{statistics.median(theirs) * 1e3:>10.2f}")
    print(f"{'ratio diffgen / transformers':<34}{statistics.median(ours) / statistics.median(theirs):>10.2f}")


if __name__ == "__main__":
    main()
