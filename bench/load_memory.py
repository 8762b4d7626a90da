"""Peak host memory while loading a sharded random checkpoint, per scheme, each in a fresh process.

Builds a ~200M-parameter random DiffusionGemma checkpoint saved in several safetensors shards
(bf16 on disk, as released checkpoints are), then loads it in a subprocess per scheme and
reports the peak resident memory the load added (VmHWM, the peak RSS of the process's own
address space — ru_maxrss would inherit the parent's — minus the RSS after imports and after
reading the tokenizer: ~210 MB of code and tokenizer that are not the weights, 2026-12),
against the bound "bf16 checkpoint size + one shard".

    python bench/load_memory.py [--schemes nf4 int8 bf16] [--shard-size 100MB]
    python bench/load_memory.py --schemes published-nvfp4

``published-nvfp4``: the same checkpoint converted shard by shard into the ModelOpt NVFP4 layout
(experts one matrix per expert, ``weight`` / ``weight_scale`` / ``weight_scale_2``, the rest bf16)
and loaded as a published NVFP4 checkpoint is; its bound is the one the loader promises for it:
the largest shard plus the quantised model (what stays resident).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/

CHILD = r"""
import json, sys
import torch, transformers, accelerate, safetensors  # imports first: the baseline
from diffgen.loading import layout, prequant, quant, streaming  # noqa: F401 - code, not weights
from transformers import AutoConfig, DiffusionGemmaForBlockDiffusion  # noqa: F401 - its modelling code too
from diffgen.loading.loader import load, load_tokenizer, resident_bytes
from diffgen.planning.plan import LoadPlan
load_tokenizer(sys.argv[1])  # the tokenizer is not weights either (its libraries' memory stays)

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def rss():
    return status("VmRSS")

base = rss()
path, scheme = sys.argv[1], sys.argv[2]
quant = "none" if scheme in ("bf16", "fp32", "published-nvfp4") else scheme
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


def to_modelopt_nvfp4(source: Path, target: Path) -> int:
    """Convert ``source`` (a bf16 checkpoint) shard by shard into the ModelOpt NVFP4 layout in
    ``target``; returns the largest shard's size in bytes."""
    import json as _json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from diffgen.kernels import nvfp4

    target.mkdir()
    for item in source.iterdir():
        if not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy(item, target / item.name)
    config = _json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    (target / "config.json").write_text(_json.dumps(config))
    weight_map = {}
    for shard in sorted(source.glob("*.safetensors")):
        out = {}
        for key, value in load_file(str(shard)).items():
            prefix, _, kind = key.rpartition(".")
            if kind in ("gate_up_proj", "down_proj") and prefix.endswith(".experts"):
                for expert in range(value.shape[0]):
                    matrix = value[expert].float()
                    parts = ({"gate_proj": matrix[: matrix.shape[0] // 2], "up_proj": matrix[matrix.shape[0] // 2:]}
                             if kind == "gate_up_proj" else {"down_proj": matrix})
                    global_scale = matrix.abs().amax() / (6 * 448)  # gate and up share it, as ModelOpt's export
                    for proj, part in parts.items():
                        packed, scale, scale2 = nvfp4.quantize(part, global_scale)
                        stem = f"{prefix}.{expert}.{proj}"
                        out[f"{stem}.weight"], out[f"{stem}.weight_scale"] = packed, scale
                        out[f"{stem}.weight_scale_2"] = scale2.clone()
            else:
                out[key] = value
        save_file(out, str(target / shard.name), metadata={"format": "pt"})
        weight_map.update({key: shard.name for key in out})
    (target / "model.safetensors.index.json").write_text(_json.dumps({"metadata": {}, "weight_map": weight_map}))
    return max(s.stat().st_size for s in target.glob("*.safetensors"))


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
            path, limit = directory, bound
            if scheme == "published-nvfp4":
                path = Path(tmp) / "nvfp4"
                largest_nvfp4 = to_modelopt_nvfp4(directory, path)
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), scheme], capture_output=True,
                                 text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            if scheme == "published-nvfp4":
                limit = largest_nvfp4 + row["resident"]
                print(f"  (published-nvfp4: largest shard {largest_nvfp4 / 1e6:.0f} MB; its bound = largest shard "
                      f"+ quantised model = {limit / 1e6:.0f} MB)")
            print(f"{scheme:<9}{row['added'] / 1e6:>14.0f}{row['resident'] / 1e6:>13.0f}"
                  f"{'yes' if row['added'] < limit else 'NO':>13}")


if __name__ == "__main__":
    main()
