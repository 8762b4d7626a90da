"""GPU check for the quantisation issue, in one call: a random model of the real dimensions
under nf4, fp8 and bf16 — resident GPU memory and denoising-step time per scheme.

No checkpoint is written: random tensors (seeded, so every scheme gets the same weights) are
generated tensor by tensor on the device and streamed through the same loader that reads
shards, so the bf16 experts never sit in memory at once for the quantised schemes. Prints a
table last.

    python bench/gpu_quant.py                         # real dimensions, cuda, nf4 fp8 bf16
    python bench/gpu_quant.py --config tiny --device cpu --schemes nf4 int8 fp32   # CPU dry run
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--schemes", nargs="+", default=["nf4", "fp8", "bf16"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch
    import transformers

    from diffgen.denoise.bench import NumbersTokenizer, random_config, random_tensors
    from diffgen.denoise.loop import StepEvent, stream
    from diffgen.loading.loader import Checkpoint, LoadedModel, resident_bytes
    from diffgen.planning.plan import UNQUANTISED, LoadPlan
    from diffgen.settings import GenerationSettings
    from diffgen.loading.streaming import build_quantized

    config = random_config(args.config)
    cuda = args.device.startswith("cuda")
    rows = []
    for scheme in args.schemes:
        dtype = UNQUANTISED.get(scheme, "bfloat16" if cuda else "float32")
        plan = LoadPlan(args.device, dtype, "none" if scheme in UNQUANTISED else scheme)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        model = build_quantized(config, random_tensors(config, args.device), plan, source="random weights").eval()
        load_s = time.perf_counter() - start
        resident = (torch.cuda.memory_allocated() - base) if cuda else resident_bytes(model)
        peak_load = (torch.cuda.max_memory_allocated() - base) if cuda else None
        loaded = LoadedModel(model, NumbersTokenizer(), GenerationSettings(), Checkpoint("random", Path("."), False),
                             plan)
        settings = replace(GenerationSettings(max_new_tokens=config.canvas_length, max_denoising_steps=args.steps,
                                              eos_token_ids=(1,), seed=0),
                           stability_threshold=None, confidence_threshold=None)
        prompt = list(range(2, 2 + args.prompt_tokens))
        times = []
        for attempt in range(2):  # the first run warms up kernels and caches
            marks = [time.perf_counter()]
            for event in stream(loaded, [prompt], settings):
                if isinstance(event, StepEvent):
                    if cuda:
                        torch.cuda.synchronize()
                    marks.append(time.perf_counter())
            if attempt:
                times = [b - a for a, b in zip(marks[1:], marks[2:])]
        rows.append((scheme, resident / 2**30, (peak_load or 0) / 2**30, load_s,
                     statistics.median(times) * 1e3 if times else float("nan")))
        del model, loaded
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"\n{device}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.config} dimensions, random weights; batch 1, {args.prompt_tokens}-token prompt, "
          f"{args.steps} fixed steps, median step after the first")
    print(f"{'scheme':<9}{'resident GiB':>13}{'load peak GiB':>14}{'load s':>8}{'ms/step':>9}")
    for scheme, resident, peak, load_s, step in rows:
        print(f"{scheme:<9}{resident:>13.2f}{peak:>14.2f}{load_s:>8.1f}{step:>9.1f}")


if __name__ == "__main__":
    main()
