"""Load times and peak host memory, first load and later loads, with and without the quantised cache.

Builds a random DiffusionGemma checkpoint in several safetensors shards (bf16 on disk, as released
checkpoints are): bench/load_memory.py's dimensions with 16 experts instead of 32 (~180M
parameters, so that a round takes a minute or two on 2 CPU cores; ``--experts 32`` gives
~330M). It reads the shards once so the OS page cache holds them for every run alike, then loads
the checkpoint in a fresh process per row:

* ``bf16``: transformers' loader (nothing to cache), twice;
* each quantised scheme: with the cache off (``DIFFGEN_QUANT_CACHE=0``, diffgen before the cache),
  then load #1 (quantises and writes the cache), then load #2 (reads the cache).

Each row gives the wall time and the process's CPU time (all threads; steadier than wall time
on a shared machine) of ``diffgen.loading.loader.load()`` (imports excluded), the peak resident
memory the load added (VmHWM minus the RSS after imports; file pages mapped from the shards or
the cache count too; the largest over rounds) and a digest of the quantised buffers (load #2
must match load #1). The cache's pages are warm for load #2 as well, since load #1 has just
written them: this measures the work saved, not a cold disk.

    python bench/load_times.py [--schemes int8 nf4] [--experts 16] [--shard-size 100MB] [--device cpu] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

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
start, cpu_start = time.perf_counter(), time.process_time()
model = load(path, plan, progress=False).model
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
added = status("VmHWM") - base
digest = hashlib.sha256()  # of the quantised buffers: load #2 must give load #1's bytes
for name, module in sorted(quantised_modules(model).items()):
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
print(json.dumps({"seconds": seconds, "cpu": cpu, "added": added, "digest": digest.hexdigest()[:8]}))
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
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every row, interleaved (medians shown)")
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
        plan = [("bf16", "load #1", off_env), ("bf16", "load #2", off_env)]
        for scheme in args.schemes:
            plan += [(scheme, "cache off", off_env), (scheme, "load #1 (writes)", on_env),
                     (scheme, "load #2 (reads)", on_env)]
        runs: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.repeat):  # rounds interleave the rows; each round starts with an empty cache
            shutil.rmtree(cache, ignore_errors=True)
            for scheme, which, env in plan:
                runs.setdefault((scheme, which), []).append(child(directory, scheme, args.device, env))
        sizes = {json.loads((entry / "manifest.json").read_text())["key"]["scheme"]:
                 sum(f.stat().st_size for f in entry.iterdir()) for entry in (cache / "quantized").iterdir()}
    print(f"device {args.device}; median of {args.repeat} interleaved round(s)")
    print(f"{'scheme':<8}{'load':<18}{'wall s':>8}{'CPU s':>8}{'added peak MB':>15}  quantised bytes (sha256)")
    for (scheme, which), rows in runs.items():
        digests = sorted({row["digest"] for row in rows}) if scheme != "bf16" else ["-"]
        print(f"{scheme:<8}{which:<18}{median(r['seconds'] for r in rows):>8.1f}{median(r['cpu'] for r in rows):>8.1f}"
              f"{max(r['added'] for r in rows) / 1e6:>15.0f}  {' '.join(digests)}")
    for scheme, size in sizes.items():
        print(f"cache entry {scheme}: {size / 1e6:.0f} MB on disk")

if __name__ == "__main__":
    main()
