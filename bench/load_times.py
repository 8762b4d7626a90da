"""Load times and peak host memory, first load and later loads, with and without the quantised cache.

Builds a random DiffusionGemma checkpoint in several safetensors shards (bf16 on disk, as released
checkpoints are): bench/load_memory.py's dimensions with 16 experts instead of 32 (~180M
parameters, so that the whole run stays near a minute on 2 CPU cores; ``--experts 32`` gives
~330M). It reads the shards once so the OS page cache holds them for every run alike, then loads
the checkpoint in a fresh process per row:

* ``bf16``: transformers' loader (nothing to cache), twice;
* each quantised scheme: with the cache off (``DIFFGEN_QUANT_CACHE=0``, diffgen before the cache),
  then load #1 (quantises and writes the cache), then load #2 (reads the cache).

Each row gives the wall time of ``diffgen.loading.loader.load()`` (imports excluded) and the peak
resident memory the load added (VmHWM minus the RSS after imports; file pages mapped from the
shards or the cache count too). The cache's pages are warm for load #2 as well, since load #1
has just written them: this measures the CPU work saved, not a cold disk.

    python bench/load_times.py [--schemes int8 nf4] [--experts 16] [--shard-size 100MB] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ and diffgen/ beside bench/

from bench.load_memory import build  # noqa: E402 - the same checkpoint as the memory benchmark

CHILD = r"""
import hashlib, json, sys, time
import torch, transformers, accelerate, safetensors  # imports first: the baseline
from diffgen.loading.loader import load
from diffgen.loading.streaming import quantised_modules
from diffgen.planning.plan import LoadPlan

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

base = status("VmRSS")
path, scheme, device = sys.argv[1:4]
plan = LoadPlan(device, "bfloat16", "none" if scheme == "bf16" else scheme)
start = time.perf_counter()
model = load(path, plan, progress=False).model
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
added = status("VmHWM") - base
digest = hashlib.sha256()  # of the quantised buffers: load #2 must give load #1's bytes
for name, module in sorted(quantised_modules(model).items()):
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
print(json.dumps({"seconds": seconds, "added": added, "digest": digest.hexdigest()[:8]}))
"""


def child(directory: Path, scheme: str, device: str, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(directory), scheme, device], capture_output=True,
                         text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["int8", "nf4"])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory, cache = Path(tmp) / "ckpt", Path(tmp) / "cache"
        started = time.perf_counter()
        params, on_disk, largest = build(directory, args.shard_size, num_experts=args.experts)
        shards = sorted(directory.glob("*.safetensors"))
        for shard in shards:  # warm the page cache for every row alike
            shard.read_bytes()
        print(f"checkpoint: {params / 1e6:.0f}M parameters, {len(shards)} shards, {on_disk / 1e6:.0f} MB bf16 on disk "
              f"(built in {time.perf_counter() - started:.0f} s); page cache warm",
              file=sys.stderr)
        base_env = {**os.environ, "DIFFGEN_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        off_env = {**base_env, "DIFFGEN_QUANT_CACHE": "0"}
        on_env = {**base_env, "DIFFGEN_QUANT_CACHE": "1"}
        rows = [("bf16", "load #1", child(directory, "bf16", args.device, off_env)),
                ("bf16", "load #2", child(directory, "bf16", args.device, off_env))]
        for scheme in args.schemes:
            rows.append((scheme, "cache off", child(directory, scheme, args.device, off_env)))
            rows.append((scheme, "load #1 (writes)", child(directory, scheme, args.device, on_env)))
            rows.append((scheme, "load #2 (reads)", child(directory, scheme, args.device, on_env)))
        sizes = {json.loads((entry / "manifest.json").read_text())["key"]["scheme"]:
                 sum(f.stat().st_size for f in entry.iterdir()) for entry in (cache / "quantized").iterdir()}
    print(f"device {args.device}")
    print(f"{'scheme':<8}{'load':<18}{'seconds':>9}{'added peak MB':>15}  quantised bytes (sha256)")
    for scheme, which, row in rows:
        digest = row["digest"] if scheme != "bf16" else "-"
        print(f"{scheme:<8}{which:<18}{row['seconds']:>9.1f}{row['added'] / 1e6:>15.0f}  {digest}")
    for scheme, size in sizes.items():
        print(f"cache entry {scheme}: {size / 1e6:.0f} MB on disk")


if __name__ == "__main__":
    main()
