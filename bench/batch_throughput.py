"""Batched vs one-by-one generation on the same machine, and whether batching changes answers.

Generates the same records with batch size 1 and with --batch-size (default 8), per-row seeds
as `diffgen batch` uses them, a fixed number of steps (adaptive stopping off), and prints
records/s and tokens/s for both, plus how many records came out token-identical.

    python bench/batch_throughput.py [--records 16] [--batch-size 8] [--steps 16] [--canvas-length 64]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--canvas-length", type=int, default=64)
    args = parser.parse_args()

    import torch

    from diffgen.records.batch import derive_seed
    from diffgen.denoise.loop import generate
    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan
    from diffgen.prompt import encode
    from devtools.tiny import save_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_checkpoint(f"{tmp}/m", canvas_length=args.canvas_length, vocab_size=2048, hidden_size=128,
                                    intermediate_size=256, num_hidden_layers=4,
                                    layer_types=["sliding_attention", "full_attention"] * 2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32, global_head_dim=32, num_experts=8,
                                    moe_intermediate_size=128)
        loaded = load(str(path), LoadPlan("cpu", "float32"), progress=False)
    params = sum(p.numel() for p in loaded.model.parameters())
    prompts = [encode(loaded.tokenizer, f"Question {i}: " + "why is the sky blue? " * (1 + i % 4))
               for i in range(args.records)]
    seeds = [derive_seed(0, i) for i in range(args.records)]
    settings = loaded.defaults.replace(max_new_tokens=args.canvas_length, max_denoising_steps=args.steps,
                                       confidence_threshold=1e-9)

    def timed(size):
        outputs = []
        start = time.perf_counter()
        for first in range(0, len(prompts), size):
            result = generate(loaded, prompts[first:first + size], settings, seeds=seeds[first:first + size])
            outputs += [c.token_ids for c in result.completions]
        return time.perf_counter() - start, outputs

    timed(args.batch_size)  # warm-up
    alone_s, alone = timed(1)
    batched_s, batched = timed(args.batch_size)
    tokens = sum(len(t) for t in batched)
    same = sum(a == b for a, b in zip(alone, batched))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"model {params / 1e6:.1f}M parameters, canvas {args.canvas_length}, {args.steps} steps, fp32, "
          f"{args.records} records")
    print(f"{'mode':<16}{'seconds':>9}{'records/s':>11}{'tokens/s':>10}")
    print(f"{'one by one':<16}{alone_s:>9.2f}{args.records / alone_s:>11.2f}{tokens / alone_s:>10.1f}")
    print(f"{'batch ' + str(args.batch_size):<16}{batched_s:>9.2f}{args.records / batched_s:>11.2f}"
          f"{tokens / batched_s:>10.1f}")
    print(f"speed-up {alone_s / batched_s:.2f}x; records identical batched vs alone: {same}/{args.records}")


if __name__ == "__main__":
    main()
