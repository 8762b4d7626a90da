# Over 500 lines on purpose: one pipeline (count the parameters, estimate each scheme, choose, make the plan)
# whose steps share the scheme tables and sizes; every caller (prepare, info, the tests) reads it as one module.
"""The load plan: where the model goes, in which dtype, with which expert quantisation, and
whether it fits.

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

from diffgen.errors import DeviceError, UsageError

if TYPE_CHECKING:
    from types import ModuleType

    import torch

    from diffgen.planning.hardware import HardwareProfile

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
SCHEMES = ("fp32", "bf16", "fp16", "fp8", "int8", "nvfp4", "nf4", "nf4-all")
QUANT_CHOICES = ("auto", *SCHEMES)
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


@dataclass(frozen=True)
class LoadPlan:
    """How to load a model.

    Attributes:
        device: torch device string (``"cpu"``, ``"cuda:0"``, ``"mps"``).
        dtype: dtype name of the unquantised weights and of compute (``"bfloat16"``, ...).
        quant: ``"none"``, ``"fp8"``, ``"int8"``, ``"nf4"`` or ``"nf4-all"``.
        offload_bytes: bytes of weights planned onto the CPU (0: everything on ``device``).
        device_map: with offload, (module prefix, device) pairs for transformers' loader.
        stored: for a pre-quantised checkpoint, its format (``ModelOpt NVFP4``...), loaded as stored.
    """

    device: str
    dtype: str
    quant: str = "none"
    offload_bytes: int = 0
    device_map: tuple[tuple[str, str], ...] = ()
    stored: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def scheme(self) -> str:
        if self.quant != "none":
            return self.quant
        return {v: k for k, v in UNQUANTISED.items()}[self.dtype]

    def describe(self) -> str:
        text = f"{self.device}, {self.scheme}"
        if self.quant != "none":
            text += f" experts (rest {self.dtype})"
        if self.stored:
            text += f", as stored ({self.stored} checkpoint)"
        if self.offload_bytes:
            text += f", {human(self.offload_bytes)} offloaded to the CPU"
        return text


def device_dtype(device: str = "auto") -> tuple[str, str]:
    """The device for ``device`` and its default dtype: CUDA bf16 (fp16 before Ampere), MPS bf16, CPU fp32."""
    import torch

    request = (device or "auto").strip().lower()
    if request == "auto":
        if torch.cuda.is_available():
            request = "cuda"
        elif _mps_available(torch):
            request = "mps"
        else:
            request = "cpu"
    if request == "cpu":
        return "cpu", "float32"
    if request == "mps":
        if not _mps_available(torch):
            raise DeviceError("--device mps was asked for, but this machine has no usable Apple MPS device",
                              "use --device cpu")
        return "mps", "bfloat16"
    if request == "cuda" or request.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was asked for, but torch sees no CUDA GPU",
                              "install a CUDA build of torch, or use --device cpu")
        index = int(request.split(":", 1)[1]) if ":" in request and request.split(":", 1)[1].isdigit() else 0
        if not 0 <= index < torch.cuda.device_count():
            raise DeviceError(f"--device {device}: there is no CUDA device {index}",
                              f"this machine has {torch.cuda.device_count()}")
        return f"cuda:{index}", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    raise DeviceError(f"unknown device {device!r}", f"use one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def simple_plan(device: str = "auto") -> LoadPlan:
    """The unquantised plan for ``device`` (no memory check)."""
    return LoadPlan(*device_dtype(device))


def _mps_available(torch: ModuleType) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


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
    import torch
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


def _dtype_bytes(dtype: str) -> int:
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
    size = _dtype_bytes(dtype)
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
    size = _dtype_bytes(dtype)
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


# -- choosing a scheme -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """One scheme's memory: ``weights`` and ``runtime`` bytes, ``fits`` the budget or not,
    ``available`` whether this device can run the scheme at all (and ``why`` not)."""

    scheme: str
    weights: int
    runtime: int
    fits: bool
    available: bool = True
    why: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.runtime

    def to_dict(self) -> dict[str, Any]:
        return {"quant": self.scheme, "weights_gb": round(self.weights / GB, 3),
                "runtime_gb": round(self.runtime / GB, 3), "total_gb": round(self.total / GB, 3),
                "fits": self.fits, "available": self.available, "why": self.why or None}


def candidate_schemes(device: str, dtype: str, hardware: HardwareProfile | None) -> list[tuple[str, bool, str]]:
    """Schemes in quality order with whether this device can run them (and why not)."""
    cuda = device.startswith("cuda")
    profile = hardware.devices[0] if hardware is not None and hardware.devices else None
    # fp8 storage: CUDA with compute capability >= 8.9, or the CPU (weight-only, for tests); not MPS.
    fp8 = (profile.fp8 if profile is not None else False) if cuda else device == "cpu"
    bf16 = dtype != "float16"
    out = [("fp32", device == "cpu", "fp32 is the CPU scheme; GPUs use bf16"),
           ("bf16", bf16, "this GPU has no bf16 (compute capability < 8.0); use fp16"),
           ("fp16", not bf16 or device != "cpu", "fp16 is for GPUs without bf16"),
           ("fp8", fp8, "fp8 experts need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell)"),
           ("int8", True, ""), ("nvfp4", True, ""), ("nf4", True, ""), ("nf4-all", True, "")]
    return out


def estimates(config: dict[str, Any], counts: ParameterCounts, *, device: str, dtype: str, budget: int | None,
              hardware: HardwareProfile | None = None, context: int = DEFAULT_CONTEXT,
              batch: int = 1, images: int = 0, only: str | None = None, linears: str | None = None,
              ) -> list[Estimate]:
    """Each scheme's memory; ``images``: images per generation (the vision workspace; their tokens
    belong in ``context``). ``only``: just that scheme (a pre-quantised checkpoint loads in its own
    format), with ``linears`` how it stores the text linears (see :func:`weight_bytes`)."""
    out = []
    for scheme, available, why in candidate_schemes(device, dtype, hardware):
        if only is not None and scheme != only:
            continue
        compute = UNQUANTISED.get(scheme, dtype)
        weights = weight_bytes(counts, scheme, dtype, linears=linears)
        runtime = sum(runtime_bytes(config, compute, context=context, batch=batch, device=device,
                                    images=images).values())
        fits = budget is None or weights + runtime <= budget
        out.append(Estimate(scheme, weights, runtime, fits, available, "" if available else why))
    return out


def choose(table: list[Estimate], requested: str, budget: int | None, *, offload: bool = False,
           can_offload: bool = True) -> Estimate:
    """The scheme to load: ``requested``, or with ``auto`` the best-quality available one that fits.

    Never over-commits: a requested scheme that does not fit, or ``auto`` with nothing that
    fits, is refused (naming the nearest option) unless ``offload`` allows the excess on the CPU.
    ``can_offload`` is false where there is no GPU to offload from: then it is not suggested.
    """
    by_name = {e.scheme: e for e in table}
    if requested != "auto":
        estimate = by_name.get(requested)
        if estimate is None:
            raise UsageError(f"unknown --quant {requested!r}", f"use one of {', '.join(QUANT_CHOICES)}")
        if not estimate.available:
            raise UsageError(f"--quant {requested} cannot run here: {estimate.why}")
        if estimate.fits or offload:
            return estimate
        raise _too_big(estimate, table, budget, can_offload)
    usable = [e for e in table if e.available]
    for estimate in usable:
        if estimate.fits:
            return estimate
    if offload:  # only unquantised weights can be offloaded: the best of those, partly on the CPU
        return next(e for e in usable if e.scheme in UNQUANTISED)
    raise _too_big(min(usable, key=lambda e: e.total), table, budget, can_offload)


def check_scheme(requested: str, device: str, dtype: str, hardware: HardwareProfile | None) -> None:
    """Refuse, before any config or weights are read, a ``--quant`` this device cannot run."""
    if requested not in QUANT_CHOICES:
        raise UsageError(f"unknown --quant {requested!r}", f"use one of {', '.join(QUANT_CHOICES)}")
    for scheme, available, why in candidate_schemes(device, dtype, hardware):
        if scheme == requested and not available:
            raise UsageError(f"--quant {requested} cannot run on {device}: {why}")


def _too_big(estimate: Estimate, table: list[Estimate], budget: int | None, can_offload: bool = True) -> UsageError:
    fitting = [e for e in table if e.available and e.fits]
    have = f"{human(budget)} usable" if budget is not None else "the budget"
    retry: tuple[tuple[str, str | None | bool], ...] = ()
    if fitting:
        hint = f"--quant {fitting[0].scheme} fits ({human(fitting[0].total)})"
        retry = (("--quant", fitting[0].scheme),)
    elif can_offload:
        hint = ("free memory, raise --max-memory if the budget is too cautious, or pass --offload "
                "(slow: offloaded layers cross PCIe at every step)")
        unquantised = next((e.scheme for e in table if e.available and e.scheme in UNQUANTISED), None)
        retry = (("--offload", None),) if estimate.scheme in UNQUANTISED or unquantised is None else (
            ("--quant", unquantised), ("--offload", None))
    else:
        hint = "free memory, or raise --max-memory if the budget is too cautious"
    return UsageError(f"--quant {estimate.scheme} needs {human(estimate.total)} "
                      f"({human(estimate.weights)} weights + {human(estimate.runtime)} runtime) and {have}", hint,
                      retry=retry)


MAX_AUTO_BATCH = 32

# The published checkpoints of the model, and the scheme each is stored in (issue 19): the bf16
# original, and ready-quantised ones that download only what runs.
PUBLISHED = (
    ("bf16", "google/diffusiongemma-26B-A4B-it"),
    ("fp8", "RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic"),
    ("nvfp4", "nvidia/diffusiongemma-26B-A4B-it-NVFP4"),
)


# Parameters of the released model (25.82B); configs at least this large are the released model's.
RELEASED_PARAMETERS = 25 * 10**9


def published_choice(table: list[Estimate]) -> tuple[str, str] | None:
    """``(scheme, Hub id)`` of the published checkpoint to pick on this machine: the best-quality
    one whose scheme is available here and fits, judged from ``table`` (the bf16 checkpoint's
    plan). ``None`` when none fits."""
    by_name = {e.scheme: e for e in table}
    for scheme, repo in PUBLISHED:
        estimate = by_name.get(scheme)
        if estimate is not None and estimate.available and estimate.fits:
            return scheme, repo
    return None


def rows_that_fit(config: dict[str, Any], estimate: Estimate, *, dtype: str, budget: int, device: str,
                  context: int = DEFAULT_CONTEXT, cap: int = MAX_AUTO_BATCH) -> int:
    """The most batch rows (up to ``cap``, at least 1) whose runtime fits next to the weights."""
    compute = UNQUANTISED.get(estimate.scheme, dtype)
    rows = 1
    for candidate in range(2, cap + 1):
        runtime = sum(runtime_bytes(config, compute, context=context, batch=candidate, device=device).values())
        if estimate.weights + runtime > budget:
            break
        rows = candidate
    return rows


def parse_size(text: str) -> int:
    """``"20GB"``, ``"18.5 GiB"``, ``"512MB"`` or a number of bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", text or "", re.IGNORECASE)
    if not match:
        raise UsageError(f"cannot read memory size {text!r}", "write it like 20GB, 18.5GiB or 512MB")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit else 1000
    return int(value * base ** powers[unit.rstrip("IB")])


def make_plan(estimate: Estimate, device: str, dtype: str, budget: int | None,
              counts: ParameterCounts | None = None) -> LoadPlan:
    """The plan for a chosen estimate; over budget (only reachable with ``--offload``) the top text
    layers go to the CPU, which works for unquantised schemes only."""
    quant = "none" if estimate.scheme in UNQUANTISED else estimate.scheme
    dtype = UNQUANTISED.get(estimate.scheme, dtype)
    if budget is None or estimate.fits:
        return LoadPlan(device, dtype, quant)
    if not device.startswith("cuda"):
        raise UsageError(f"{estimate.scheme} does not fit ({human(estimate.total)} for {human(budget)} usable), and "
                         f"--offload only moves layers from a CUDA GPU to the CPU",
                         "free memory, or raise --max-memory if the budget is too cautious")
    if quant != "none":
        unquantised = {v: k for k, v in UNQUANTISED.items()}.get(dtype, "bf16")
        raise UsageError(f"--offload works with unquantised weights; {estimate.scheme} does not fit "
                         f"({human(estimate.total)} for {human(budget)} usable)",
                         f"use --quant {unquantised} --offload, or free memory", retry=(("--quant", unquantised),))
    if counts is None:
        raise ValueError("an offload plan needs the parameter counts")
    mapping = offload_device_map(counts, dtype, device, budget, estimate.runtime)
    return LoadPlan(device, dtype, quant, max(0, estimate.total - budget), tuple(mapping.items()))


def offload_device_map(counts: ParameterCounts, dtype: str, device: str, budget: int, runtime: int) -> dict[str, str]:
    """A device map that keeps everything but the last text layers on ``device``.

    Layers go to the CPU from the top down until the rest fits ``budget - runtime``; encoder
    layer i and decoder layer i always land on the same device (they share their weights).
    """
    size = _dtype_bytes(dtype)
    resident = weight_bytes(counts, {v: k for k, v in UNQUANTISED.items()}[dtype], dtype)
    room = budget - runtime
    mapping = {"": device}
    for index in range(len(counts.layers) - 1, -1, -1):
        if resident <= room:
            break
        mapping[f"model.encoder.language_model.layers.{index}"] = "cpu"
        mapping[f"model.decoder.layers.{index}"] = "cpu"
        resident -= counts.layers[index] * size
    return mapping
