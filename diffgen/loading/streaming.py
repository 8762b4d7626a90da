"""Loading a checkpoint tensor by tensor, quantising experts (and linears) on the way in.

The model is built with empty (meta) weights; each tensor is then read from its safetensors
shard, cast, moved to the device and — for expert tensors — quantised expert by expert, so
the bf16 experts never sit in memory all at once, on the host or on the GPU. Encoder layer i
and decoder layer i share one quantised module, and the other tied weights are re-tied to
the decoder's after loading, as transformers ties them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_module_tensor_to_device

from diffgen.errors import NotACheckpointError
from diffgen.planning.plan import LoadPlan, keeps_dtype
from diffgen.loading.quant import QuantizedExperts, QuantizedLinear
from diffgen.loading.shards import shard_files

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _swap_modules(model: Any, plan: LoadPlan, device: torch.device) -> None:
    """Replace experts (and for nf4-all the text linears) by quantised modules shared by the
    encoder and decoder layer of the same index."""
    dtype = plan.torch_dtype
    expert_scheme = "nf4" if plan.quant == "nf4-all" else plan.quant
    pairs = zip(model.model.encoder.language_model.layers, model.model.decoder.layers)
    for encoder_layer, decoder_layer in pairs:
        shared = QuantizedExperts(decoder_layer.experts, expert_scheme, dtype, device)
        encoder_layer.experts = decoder_layer.experts = shared
        if plan.quant != "nf4-all":
            continue
        for name in LINEAR_NAMES:
            parent_name, _, leaf = name.rpartition(".")
            decoder_parent = decoder_layer.get_submodule(parent_name)
            original = getattr(decoder_parent, leaf, None)
            if original is None:
                continue  # e.g. full-attention layers have no v_proj
            linear = QuantizedLinear(original, dtype, device)
            setattr(decoder_parent, leaf, linear)
            setattr(encoder_layer.get_submodule(parent_name), leaf, linear)


def _retie(model: Any) -> None:
    """Point the encoder's text weights and the LM head at the decoder's (transformers' ties)."""
    decoder = model.model.decoder
    encoder = model.model.encoder.language_model
    for name, module in decoder.named_modules():
        try:
            twin = encoder.get_submodule(name) if name else encoder
        except AttributeError:
            continue
        if twin is module:
            continue
        for pname, param in module._parameters.items():
            if param is not None and pname in twin._parameters:
                twin._parameters[pname] = param
    model.lm_head.weight = decoder.embed_tokens.weight


def load_quantized(path: Path, plan: LoadPlan, *, progress: bool = False) -> Any:
    """Build the model empty, then stream every tensor of the checkpoint's shards in under ``plan``."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    files = shard_files(path)
    bar = _progress(progress, len(files))

    def tensors():
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as shard:
                for key in shard.keys():
                    yield key, shard.get_tensor(key)
            if bar is not None:
                bar.update(1)

    model = build_quantized(config, tensors(), plan, source=str(path))
    if bar is not None:
        bar.close()
    return model


def build_quantized(config: Any, tensors: Any, plan: LoadPlan, *, source: str = "the checkpoint") -> Any:
    """An empty model filled from ``(name, tensor)`` pairs (checkpoint names) under ``plan``."""
    from accelerate import init_empty_weights
    from transformers import DiffusionGemmaForBlockDiffusion

    device = torch.device(plan.device)
    dtype = plan.torch_dtype
    with init_empty_weights(include_buffers=False):
        model = DiffusionGemmaForBlockDiffusion(config)
    model.tie_weights()
    # Buffers (rotary tables, scalars) were built for real on the CPU: move them to the device,
    # scalars in the weights' dtype as transformers would. (Before the swap: the quantised
    # modules' own buffers are created on the device in their storage dtypes and stay so.)
    for name, buffer in list(model.named_buffers()):
        value = buffer if keeps_dtype(name, buffer) else buffer.to(dtype)
        set_module_tensor_to_device(model, name, device, value=value, dtype=value.dtype)
    if plan.quant != "none":
        _swap_modules(model, plan, device)

    for key, tensor in tensors:
        _place(model, key, tensor, device, dtype)
    _retie(model)
    missing = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if missing:
        raise NotACheckpointError(f"{source} lacks {len(missing)} weights the model needs (first: {missing[0]})",
                                  "the checkpoint is incomplete; download it again")
    return model


def _place(model: Any, key: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    module_name, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if isinstance(module, QuantizedLinear) and leaf == "weight":
        module.store(tensor)
        return
    if isinstance(module, QuantizedExperts):
        module.store(leaf, tensor)
        return
    if module is None or (leaf not in module._parameters and leaf not in module._buffers):
        raise NotACheckpointError(f"checkpoint tensor {key} has no place in this DiffusionGemma model",
                                  "this checkpoint's layout is not one the quantising loader knows; "
                                  "try --quant bf16")
    value = tensor if keeps_dtype(key, tensor) else tensor.to(dtype)
    if value is tensor and device.type == "cpu":
        # A safetensors tensor can be a view of the shard's memory map; a copy lets the map go.
        value = tensor.clone()
    # accelerate would cast to the empty parameter's dtype (the default, fp32); keep ours.
    set_module_tensor_to_device(model, key, device, value=value, dtype=value.dtype)


def _progress(show: bool, total: int) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Loading and quantising shards", unit="shard")
