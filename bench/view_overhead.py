"""What --show-steps costs: generation time with and without the step view, same process.

For each model (the tiny test model, and a larger random one with the real canvas of 256
tokens), times the same seeded generation four ways, interleaved, median of --reps:

* bare: ``generate()``, no step events at all;
* live: step events -> host records -> the Rich live view (a forced terminal writing to
  memory, so rendering is paid in full), redrawn at most 30 times a second;
* live-every-step: the same view redrawn at every step, no throttle;
* plain: the plain one-line-per-step log.

    python bench/view_overhead.py [--reps 5] [--steps 16]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    import torch
    from rich.console import Console

    from diffgen.denoise.loop import generate, stream
    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan
    from diffgen.prompt import encode
    from devtools.tiny import save_tiny_checkpoint
    from diffgen.records.trace import TokenTexts, records
    from diffgen.ui.view import LiveView, PlainStepLog

    models = {
        "tiny (canvas 16)": {"canvas_length": 16},
        "larger (canvas 256)": {"canvas_length": 256, "vocab_size": 4096, "hidden_size": 256,
                                "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                                "layer_types": ["sliding_attention", "full_attention"] * 2,
                                "num_key_value_heads": 2, "head_dim": 64, "global_head_dim": 64,
                                "num_experts": 8, "moe_intermediate_size": 256},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in models.items():
            loaded = load(str(save_tiny_checkpoint(f"{tmp}/{len(rows)}", **overrides)), LoadPlan("cpu", "float32"),
                          progress=False)
            params = sum(p.numel() for p in loaded.model.parameters())
            canvas = loaded.model.config.canvas_length
            ids = encode(loaded.tokenizer, "Why is the sky blue?")
            settings = loaded.defaults.replace(seed=0, max_new_tokens=2 * canvas, max_denoising_steps=args.steps,
                                               confidence_threshold=1e-9)
            texts = TokenTexts(loaded.tokenizer)

            def bare():
                generate(loaded, [ids], settings)

            def observed(make_sink):
                with make_sink() as sink:
                    for record in records(stream(loaded, [ids], settings), texts):
                        sink.update(record)

            def console():
                return Console(file=io.StringIO(), force_terminal=True, width=100, height=40)

            ways = {
                "bare": bare,
                "live": lambda: observed(lambda: LiveView(console())),
                "live-every-step": lambda: observed(lambda: LiveView(console(), max_fps=0)),
                "plain": lambda: observed(lambda: PlainStepLog(io.StringIO())),
            }
            for way in ways.values():
                way()  # warm-up
            times = {key: [] for key in ways}
            for _ in range(args.reps):
                for key, way in ways.items():
                    start = time.perf_counter()
                    way()
                    times[key].append(time.perf_counter() - start)
            base = statistics.median(times["bare"])
            for key in ways:
                median = statistics.median(times[key])
                rows.append((name, f"{params / 1e6:.2f}M", key, median, median / base - 1))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"batch 1, 2 canvases x {args.steps} steps, fp32, median of {args.reps}")
    print(f"{'model':<22}{'params':>8}  {'way':<17}{'seconds':>9}{'overhead':>10}")
    for name, params, key, median, overhead in rows:
        print(f"{name:<22}{params:>8}  {key:<17}{median:>9.3f}{overhead * 100:>9.1f}%")


if __name__ == "__main__":
    main()
