"""Tiny checkpoints in the published pre-quantised layouts, written from the tiny random model.

Each writer takes a saved tiny checkpoint and writes two directories: the checkpoint in the
published layout (tensor names, dtypes, shapes, nibble order, scale conventions, config files as
the producers write them; see :mod:`diffgen.loading.prequant` for the sources), and a plain
checkpoint, in transformers' own layout, holding the weights that layout decodes to. Every scale is
a power of two, so decoding is exact in fp32 and the two describe the same model bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffgen.kernels import nvfp4

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def pow2_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= ``x`` (elementwise, for positive ``x``; 1 where ``x`` is 0)."""
    x = torch.where(x > 0, x, torch.ones_like(x))
    return torch.exp2(torch.ceil(torch.log2(x)))


def nvfp4_exact(weight: torch.Tensor, global_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed, e4m3 block scales, decoded fp32)`` with power-of-two block scales."""
    out_dim, in_dim = weight.shape
    blocks = weight.float().view(out_dim, in_dim // 16, 16)
    scale = pow2_at_least(blocks.abs().amax(-1) / (6 * global_scale)).clamp(2.0**-9, 256.0)
    codes = nvfp4.e2m1_codes((blocks / (scale * global_scale).unsqueeze(-1)).view(out_dim, in_dim))
    packed = nvfp4.pack(codes)
    scale8 = scale.to(torch.float8_e4m3fn)
    assert torch.equal(scale8.float(), scale)
    decoded = nvfp4.dequantize(packed[None], scale8[None], torch.full((1, out_dim, 1), global_scale),
                               out_dim, in_dim, torch.float32)[0]
    return packed, scale8, decoded


def fp8_exact(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e4m3 values, bf16 per-row scales [out, 1], decoded fp32)`` with power-of-two row scales."""
    scale = pow2_at_least(weight.float().abs().amax(-1, keepdim=True) / 448)
    q = (weight.float() / scale).to(torch.float8_e4m3fn)
    return q, scale.to(torch.bfloat16), q.float() * scale


def _experts(tensors: dict[str, torch.Tensor]):
    """``(prefix, expert, projection, matrix)`` of every expert matrix, removing the fused tensors."""
    for key in [k for k in tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        fused = tensors.pop(key)
        prefix, _, kind = key.rpartition(".")
        for expert in range(fused.shape[0]):
            if kind == "gate_up_proj":
                half = fused.shape[1] // 2
                yield key, prefix, expert, "gate_proj", fused[expert, :half]
                yield key, prefix, expert, "up_proj", fused[expert, half:]
            else:
                yield key, prefix, expert, "down_proj", fused[expert]


def write(src: Path, root: Path, layout: str, *, config_extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``root/<layout>`` (the published layout) and ``root/<layout>-decoded`` (plain) from
    tiny checkpoint ``src``; ``layout`` is ``modelopt-nvfp4``, ``ct-nvfp4`` or ``ct-fp8``."""
    quantised, plain = root / layout, root / f"{layout}-decoded"
    for target in (quantised, plain):
        shutil.copytree(src, target)
    tensors = load_file(str(src / "model.safetensors"))
    decoded = dict(tensors)
    out = dict(tensors)
    fused: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for key, prefix, expert, proj, matrix in _experts(out):
        stem = f"{prefix}.{expert}.{proj}"
        if layout == "ct-fp8":
            q, scale, dec = fp8_exact(matrix)
            out[f"{stem}.weight"], out[f"{stem}.weight_scale"] = q, scale
        else:
            # gate and up share one multiplier in ModelOpt's export; compressed-tensors scales them apart.
            exponent = {"gate_proj": -3, "up_proj": -2, "down_proj": -4}[proj] if layout == "ct-nvfp4" else -3
            packed, scale8, dec = nvfp4_exact(matrix, 2.0**exponent)
            if layout == "modelopt-nvfp4":
                out[f"{stem}.weight"], out[f"{stem}.weight_scale"] = packed, scale8
                out[f"{stem}.weight_scale_2"] = torch.tensor(2.0**exponent)
                out[f"{stem}.input_scale"] = torch.tensor(0.01)
            else:
                out[f"{stem}.weight_packed"], out[f"{stem}.weight_scale"] = packed, scale8
                out[f"{stem}.weight_global_scale"] = torch.tensor([2.0**-exponent])
                out[f"{stem}.input_global_scale"] = torch.tensor([100.0])
        fused.setdefault(key, {})[(expert, proj)] = dec
    for key, parts in fused.items():
        experts = 1 + max(e for e, _ in parts)
        if key.endswith("gate_up_proj"):
            decoded[key] = torch.stack([torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(experts)])
        else:
            decoded[key] = torch.stack([parts[(e, "down_proj")] for e in range(experts)])
    if layout == "ct-fp8":
        for key in list(out):
            if key.startswith("model.decoder.layers.") and key.endswith(".weight") and \
                    any(key.endswith(f"{name}.weight") for name in LINEARS):
                q, scale, dec = fp8_exact(out[key])
                out[key] = q
                out[key.replace(".weight", ".weight_scale")] = scale
                decoded[key] = dec
    save_file(out, str(quantised / "model.safetensors"), metadata={"format": "pt"})
    save_file(decoded, str(plain / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(layout)
    config["quantization_config"].update(config_extra or {})
    (quantised / "config.json").write_text(json.dumps(config, indent=2))
    if layout == "modelopt-nvfp4":
        (quantised / "hf_quant_config.json").write_text(json.dumps(hf_quant_config(), indent=2))
    return quantised, plain


def hf_quant_config() -> dict:
    """ModelOpt's ``hf_quant_config.json`` for an experts-only NVFP4 export."""
    return {"producer": {"name": "modelopt", "version": "0.39.0"},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                             "exclude_modules": ["lm_head", "model.decoder.layers.*.self_attn*",
                                                 "model.decoder.layers.*.mlp*", "model.decoder.layers.*.router*",
                                                 "model.decoder.self_conditioning*", "model.vision_tower*"]}}


def quantization_config(layout: str) -> dict:
    """``config.json``'s ``quantization_config`` as each producer writes it."""
    if layout == "modelopt-nvfp4":
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                "exclude_modules": hf_quant_config()["quantization"]["exclude_modules"]}
    if layout == "ct-nvfp4":
        return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                "quantization_status": "compressed",
                "config_groups": {"group_0": {
                    "targets": ["re:.*experts.*"], "format": "nvfp4-pack-quantized",
                    "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                "symmetric": True, "dynamic": False},
                    "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                          "group_size": 16, "symmetric": True, "dynamic": "local"}}},
                "ignore": ["lm_head", "re:.*router.*", "re:.*vision.*"]}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "format": "float-quantized",
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True}}},
            "ignore": ["lm_head", "re:.*router.*", "re:.*vision.*", "re:.*self_conditioning.*"]}
