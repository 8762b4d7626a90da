"""Peak host memory while loading a sharded random checkpoint, per scheme, each in a fresh process.

Builds a ~200M-parameter random DiffusionGemma checkpoint saved in several safetensors shards
(bf16 on disk, as released checkpoints are), then loads it in a subprocess per scheme and
reports the peak resident memory the load added (VmHWM, the peak RSS of the process's own
address space — ru_maxrss would inherit the parent's — minus the RSS after imports),
against the bound "bf16 checkpoint size + one shard".

    python bench/load_memory.py [--schemes nf4 int8 bf16] [--shard-size 100MB]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
import torch, transformers, accelerate, safetensors  # imports first: the baseline
from diffgen.loading.loader import load, resident_bytes
from diffgen.planning.plan import LoadPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def rss():
    return status("VmRSS")

base = rss()
path, scheme = sys.argv[1], sys.argv[2]
quant = "none" if scheme in ("bf16", "fp32") else scheme
dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(scheme, "bfloat16")
loaded = load(path, LoadPlan("cpu", dtype, quant), progress=False)
peak = status("VmHWM")
print(json.dumps({"scheme": scheme, "baseline": base, "peak": peak, "added": peak - base,
                  "resident": resident_bytes(loaded.model)}))
"""

SIZE = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 64, "global_head_dim": 64, "num_experts": 32, "moe_intermediate_size": 768}


def build(directory: Path, shard_size: str, **overrides: int) -> tuple[int, int, int]:
    """Save the random checkpoint (``SIZE``, with ``overrides``); ``(parameters, bytes on disk, largest shard)``."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from devtools.tiny import build_tokenizer, tiny_config

    size = {**SIZE, **overrides}
    config = tiny_config(vocab_size=size["vocab_size"], canvas_length=64,
                         **{k: v for k, v in size.items() if k != "vocab_size"})
    with torch.device("cpu"):
        model = DiffusionGemmaForBlockDiffusion(config).to(torch.bfloat16)
    model.tie_weights()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size=shard_size)
    build_tokenizer(SIZE["vocab_size"]).save_pretrained(directory)
    shards = sorted(directory.glob("*.safetensors"))
    return params, sum(s.stat().st_size for s in shards), max(s.stat().st_size for s in shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["nf4", "int8", "fp8", "nf4-all", "bf16"])
    parser.add_argument("--shard-size", default="100MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        params, on_disk, largest = build(directory, args.shard_size)
        shards = len(list(directory.glob("*.safetensors")))
        bound = on_disk + largest
        print(f"checkpoint: {params / 1e6:.0f}M parameters, {shards} shards, {on_disk / 1e6:.0f} MB bf16 on disk, "
              f"largest shard {largest / 1e6:.0f} MB; bound = bf16 size + one shard = {bound / 1e6:.0f} MB")
        print(f"{'scheme':<9}{'added peak MB':>14}{'resident MB':>13}{'under bound':>13}")
        for scheme in args.schemes:
            out = subprocess.run([sys.executable, "-c", CHILD, str(directory), scheme], capture_output=True,
                                 text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"{scheme:<9}{row['added'] / 1e6:>14.0f}{row['resident'] / 1e6:>13.0f}"
                  f"{'yes' if row['added'] < bound else 'NO':>13}")


if __name__ == "__main__":
    main()
