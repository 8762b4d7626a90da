"""Where one denoising step's time goes: torch.profiler over eager fast steps of a random model.

Builds the model once (``--config real`` on the GPU, a config.json path for a CPU dry run),
runs one warm-up generation, then profiles ``--steps`` eager steps of a second one and prints
the kernels that took the most device time, and the named phases of the step.

    python bench/gpu_profile.py                           # GPU
    python bench/gpu_profile.py --config tiny.json --device cpu
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--scheme", default="none")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from diffgen.denoise import bench, step
    from diffgen.denoise.loop import stream
    from diffgen.planning.plan import LoadPlan

    cuda = args.device.startswith("cuda")
    loaded = bench.random_model(args.config, LoadPlan(args.device, "bfloat16" if cuda else "float32", args.scheme))
    canvas = int(loaded.model.config.canvas_length)
    settings = replace(loaded.defaults.replace(max_new_tokens=canvas, max_denoising_steps=args.steps + 2, seed=0),
                       stability_threshold=None, confidence_threshold=None, eos_token_ids=(10**9,))
    prompt = list(range(300, 364))
    for _ in stream(loaded, [prompt], settings, exact=False, graphs=False, observe=False):
        pass

    # Name the phases of the step.
    decoder_call = step.Decoder.__call__

    def named_decoder(self, *a, **k):
        with record_function("phase: decoder + lm_head"):
            return decoder_call(self, *a, **k)

    step.Decoder.__call__ = named_decoder
    sampler_cls = type(stream(loaded, [prompt], settings, exact=False, graphs=False)._sampler(1, loaded.model.device))
    draw = sampler_cls.draw

    def named_draw(self, *a, **k):
        with record_function("phase: sampler tail"):
            return draw(self, *a, **k)

    sampler_cls.draw = named_draw
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for event in stream(loaded, [prompt], settings, exact=False, graphs=False):
            if cuda:
                torch.cuda.synchronize()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    try:
        key_table = prof.key_averages().table(sort_by="self_" + key.replace("_total", "_total"), row_limit=args.rows,
                                              max_name_column_width=70)
    except Exception:  # noqa: BLE001 - column names differ across torch releases
        key_table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70)
    print(key_table)
    phases = [e for e in prof.key_averages() if e.key.startswith("phase:")]
    for event in phases:
        device_time = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        print(f"{event.key:<32} calls {event.count:>3}  cpu {event.cpu_time_total / 1e3:>9.2f} ms  "
              f"device {device_time / 1e3:>9.2f} ms")


if __name__ == "__main__":
    main()
