"""What the first generation of a process costs, and what the on-disk kernel caches save.

Builds a random model of the released model's width with only ``--layers`` layers (so the
model build stays seconds), runs one generation (the first call: Triton compiles its kernels
unless ``TRITON_CACHE_DIR`` already holds them, CUDA graphs are recorded, cuBLAS warms up),
then a second one, and prints both as JSON. Run it twice with the same ``TRITON_CACHE_DIR``
to see what the second CLI call pays:

    TRITON_CACHE_DIR=$(mktemp -d) python bench/first_call.py; python bench/first_call.py  # same dir
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--config", default="real", help="real or a config.json path (dry runs)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--scheme", default="none")
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    import torch

    from diffgen.denoise import bench
    from diffgen.denoise.loop import Execution, stream
    from diffgen.planning.plan import LoadPlan

    config = bench.random_config(args.config)
    text = config.text_config
    text.num_hidden_layers = args.layers
    text.layer_types = text.layer_types[: args.layers]
    cuda = args.device.startswith("cuda")
    plan = LoadPlan(args.device, "bfloat16" if cuda else "float32", args.scheme)
    from diffgen.loading.streaming import build_quantized

    model = build_quantized(config, bench.random_tensors(config, plan.device), plan, source="random weights").eval()
    from diffgen.loading.loader import Checkpoint, LoadedModel
    from diffgen.settings import GenerationSettings

    loaded = LoadedModel(model, bench.NumbersTokenizer(), GenerationSettings(), Checkpoint("random", Path("."), False),
                         plan)
    settings = replace(GenerationSettings(max_new_tokens=2 * config.canvas_length, max_denoising_steps=args.steps,
                                          eos_token_ids=(1,), seed=0), stability_threshold=None,
                       confidence_threshold=None)
    prompt = list(range(300, 364))
    times = []
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        generation = stream(loaded, [prompt], settings, execution=Execution(exact=False), observe=False)
        for _ in generation:
            pass
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    runner = generation.runner
    print(json.dumps({"layers": args.layers, "scheme": args.scheme, "first_call_s": times[0], "second_call_s": times[1],
                      "capture_s_second": runner.capture_seconds if runner else 0.0,
                      "graph_failure": runner.failed if runner else None}))


if __name__ == "__main__":
    main()
