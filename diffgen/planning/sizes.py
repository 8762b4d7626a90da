"""What the model takes in memory, from ``config.json`` alone: parameters counted, each
scheme's resident bytes, and the runtime's (KV cache, workspaces) for a context and batch.

The memory estimate comes from ``config.json`` alone: the model is instantiated on the meta
device (no weights read, no memory used) to count every parameter exactly, ties included, and
each scheme's storage is computed from those shapes (docs/architecture.md, "Facts the code relies on"):

=========  ====================================================================================
scheme     weights
=========  ====================================================================================
fp32       everything fp32 (the CPU default)
bf16/fp16  everything 16-bit
fp8        experts float8 e4m3 + one fp32 scale per output row (cc >= 8.9 on CUDA); rest 16-bit
int8       experts int8 weight-only + one fp32 scale per output row; rest 16-bit
nvfp4      experts NVIDIA's NVFP4 layout: e2m1 codes, an e4m3 scale per 16 and an fp32 scale per row
           (4.5 bits); rest 16-bit — the 4-bit scheme ``auto`` picks, and the layout of the
           published NVFP4 checkpoints
nf4        experts 4-bit NF4, blocks of 64 with an fp32 absmax (4.5 bits); rest 16-bit
nf4-all    nf4 experts, and the attention / dense-MLP linears of the text layers as NF4 too
=========  ====================================================================================

Router, embeddings / LM head, self-conditioning and the vision tower always stay unquantised.
Runtime memory adds the KV cache for the context, the prefill workspace and the canvas /
sampler workspace per batch row, and with images the vision tower's workspace; each image's
soft tokens (at most :data:`IMAGE_TOKENS` plus two brackets) count against the context.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

UNQUANTISED = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NF4_BLOCK = 64
NVFP4_BLOCK = 16
# Each nf4 stack keeps its 16-level fp32 code table on the device (diffgen.loading.quant).
NF4_CODE_BYTES = 16 * 4
GB = 1000**3
GiB = 1024**3
CUDA_CONTEXT = int(0.5 * GiB)
DEFAULT_CONTEXT = 8192
# Text-layer linears that nf4-all quantises (attention and the dense MLP).
LINEAR_PATTERN = re.compile(r"\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
EXPERT_PATTERN = re.compile(r"\.layers\.\d+\.experts\.(gate_up_proj|down_proj)$")
# Soft tokens per image at most, and patches the vision tower sees per image: the released processor's
# settings (max_soft_tokens 280, patches pooled 3 x 3). Each image adds two bracket tokens.
IMAGE_TOKENS = 280
IMAGE_PATCHES = IMAGE_TOKENS * 9
LAYER_INDEX = re.compile(r"language_model\.layers\.(\d+)\.|decoder\.layers\.(\d+)\.")


# -- counting parameters from config.json --------------------------------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    """Every unique parameter of the model by role (numbers of elements), from the config.

    Attributes:
        experts: shapes ``(E, out, in)`` of the fused expert tensors (one per layer and kind).
        linears: numels of the text-layer attention / dense-MLP linear weights.
        other: numel of everything else (embeddings, norms, router, vision, ...).
        buffers: bytes of the rotary tables (``inv_freq``), which stay fp32 whatever the dtype.
        cast_buffers: elements of the other floating buffers (scalars), stored in the weights' dtype.
        layers: numel of each text layer (encoder and decoder layer i share theirs), for offload maps.
        vision: numel of the vision tower and its projection into the text model (part of ``other``).
        linear_shapes: the ``(out, in)`` of each of ``linears``, in the same order.
    """

    experts: tuple[tuple[int, int, int], ...]
    linears: tuple[int, ...]
    other: int
    buffers: int
    cast_buffers: int = 0
    layers: tuple[int, ...] = ()
    vision: int = 0
    linear_shapes: tuple[tuple[int, int], ...] = ()

    @property
    def total(self) -> int:
        return sum(e * o * i for e, o, i in self.experts) + sum(self.linears) + self.other


def count_parameters(config: dict[str, Any]) -> ParameterCounts:
    """Instantiate the model on the meta device from ``config`` (a parsed config.json) and count."""
    from accelerate import init_empty_weights
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    model_config = DiffusionGemmaConfig.from_dict(dict(config))
    with init_empty_weights(include_buffers=False):
        model = DiffusionGemmaForBlockDiffusion(model_config)
    model.tie_weights()
    experts, linears, shapes, other, vision = [], [], [], 0, 0
    layers = [0] * model.config.text_config.num_hidden_layers
    for name, param in model.named_parameters():  # unique parameters: ties counted once
        layer = LAYER_INDEX.search(name)
        if layer and "vision" not in name:
            layers[int(layer.group(1) or layer.group(2))] += param.numel()
        if EXPERT_PATTERN.search(name):
            experts.append(tuple(param.shape))
        elif "vision" not in name and LINEAR_PATTERN.search(name):
            linears.append(param.numel())
            shapes.append(tuple(param.shape))
        else:
            other += param.numel()
        if "vision" in name:
            vision += param.numel()
    fixed = cast = 0
    for name, buffer in model.named_buffers():
        if keeps_dtype(name, buffer):
            fixed += buffer.numel() * buffer.element_size()
        else:
            cast += buffer.numel()
    return ParameterCounts(tuple(experts), tuple(linears), other, fixed, cast, tuple(layers), vision, tuple(shapes))


def keeps_dtype(name: str, buffer: torch.Tensor) -> bool:
    """Whether a buffer keeps its dtype when the weights are cast (as transformers loads them):
    rotary frequency tables and non-floating buffers do; scalars follow the weights' dtype."""
    return "inv_freq" in name or not buffer.is_floating_point()


def human(nbytes: int) -> str:
    """``18.8 GB``, ``230 MB``, ``12 kB`` (decimal units, as disk and download sizes are given)."""
    for unit, size in (("GB", GB), ("MB", 1000**2), ("kB", 1000)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}" if unit == "GB" else f"{nbytes / size:.0f} {unit}"
    return f"{nbytes} B"


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of an unquantised weight in ``dtype`` (4 for float32, else 2)."""
    return 4 if dtype == "float32" else 2


def nf4_bytes(numel: int) -> int:
    """Packed 4-bit values plus one fp32 absmax per block of 64."""
    return numel // 2 + math.ceil(numel / NF4_BLOCK) * 4


def nvfp4_bytes(out_dim: int, in_dim: int) -> int:
    """Packed e2m1 codes, one e4m3 scale per 16 and one fp32 scale per output row."""
    return out_dim * in_dim // 2 + out_dim * in_dim // NVFP4_BLOCK + out_dim * 4


def weight_bytes(counts: ParameterCounts, scheme: str, dtype: str, *, linears: str | None = None) -> int:
    """Bytes of weights resident under ``scheme`` (``dtype`` for what stays unquantised);
    ``linears``: how a pre-quantised checkpoint stores the text layers' linears (``fp8``,
    ``nvfp4``), when it quantises them too."""
    if scheme in UNQUANTISED:
        dtype = UNQUANTISED[scheme]
    size = dtype_bytes(dtype)
    total = (counts.other + counts.cast_buffers) * size + counts.buffers
    for experts, out_dim, in_dim in counts.experts:
        numel = experts * out_dim * in_dim
        if scheme in ("fp8", "int8"):
            total += numel + experts * out_dim * 4
        elif scheme in ("nf4", "nf4-all"):
            total += experts * nf4_bytes(out_dim * in_dim) + NF4_CODE_BYTES
        elif scheme == "nvfp4":
            total += experts * nvfp4_bytes(out_dim, in_dim)
        else:
            total += numel * size
    for numel, shape in zip(counts.linears, counts.linear_shapes or [None] * len(counts.linears)):
        if scheme == "nf4-all":
            total += nf4_bytes(numel) + NF4_CODE_BYTES
        elif linears == "fp8" and shape is not None:
            total += numel + shape[0] * 4
        elif linears == "nvfp4" and shape is not None:
            total += nvfp4_bytes(*shape)
        else:
            total += numel * size
    return total


def image_context(images: int, tokens_per_image: int | None = None) -> int:
    """Context positions that ``images`` images take at most (soft tokens and brackets);
    ``tokens_per_image``: the checkpoint processor's soft tokens (default :data:`IMAGE_TOKENS`)."""
    return images * ((tokens_per_image or IMAGE_TOKENS) + 2)


def runtime_bytes(config: dict[str, Any], dtype: str, *, context: int = DEFAULT_CONTEXT, batch: int = 1,
                  device: str = "cuda", images: int = 0) -> dict[str, int]:
    """Runtime memory beyond the weights, by part (an estimate; docs/architecture.md, "Facts the code relies on").

    ``kv``: the KV cache for ``context`` tokens (sliding layers keep at most their window);
    ``prefill``: one full-attention layer's scores for the longest prefill (a workspace the
    layers reuse, not one per batch row) plus activations per batch row;
    ``canvas``: per batch row, the logits-sized buffers of a step and decoder activations: in
    fp32 (the exact sampler on the CPU) ~5 fp32 buffers (logits, scaled, probabilities, entropy
    temporaries); in half precision (the fast step) raw logits, scaled logits, their graph copy
    and the bf16 self-conditioning probabilities (2 bytes each) plus its fp32 softmax;
    ``context``: CUDA context and allocator slack;
    ``vision`` (with ``images``): the vision tower runs once over all the batch's images, in the
    prefill: per image one layer's attention scores over its :data:`IMAGE_PATCHES` patches plus
    its activations.
    """
    text = config.get("text_config", config)
    size = dtype_bytes(dtype)
    hidden = text["hidden_size"]
    heads = text["num_attention_heads"]
    window = text.get("sliding_window", context)
    layer_types = text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"]
    per_layer = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
    kv = 0
    for index, kind in enumerate(layer_types):
        override = per_layer.get(index, {})
        if kind == "full_attention" and not override:
            override = {"head_dim": text.get("global_head_dim", text["head_dim"]),
                        "num_key_value_heads": text.get("num_global_key_value_heads") or text["num_key_value_heads"]}
        head_dim = override.get("head_dim", text["head_dim"])
        kv_heads = override.get("num_key_value_heads", text["num_key_value_heads"])
        tokens = min(context, window) if kind == "sliding_attention" else context
        kv += 2 * tokens * kv_heads * head_dim * size
    canvas = config.get("canvas_length", 256)
    vocab = text["vocab_size"]
    parts = {
        "kv": kv * batch,
        "prefill": heads * context * context * size + batch * context * hidden * 8 * size,
        "canvas": batch * (canvas * vocab * (20 if size >= 4 else 12) + canvas * hidden * 32 * size),
        "context": CUDA_CONTEXT if device.startswith("cuda") else 0,
    }
    vision = config.get("vision_config") or {}
    if images and vision:
        patches = IMAGE_PATCHES
        parts["vision"] = images * (vision.get("num_attention_heads", 16) * patches * patches * size
                                    + patches * vision.get("hidden_size", 1152) * 8 * size)
    return parts
