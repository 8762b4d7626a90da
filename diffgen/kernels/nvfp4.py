"""NVFP4: 4-bit e2m1 weights with e4m3 scales per 16 and an fp32 scale per row, and its grouped product.

The layout is NVIDIA's NVFP4 as Model-Optimizer exports it and compressed-tensors packs it
(``nvfp4-pack-quantized``), checked against their sources (2026-12):

* codes: each weight is one e2m1 nibble — bit 3 the sign, bits 0-2 an index into the magnitudes
  0, 0.5, 1, 1.5, 2, 3, 4, 6 (ModelOpt ``qtensor/nvfp4_tensor.py``: ``e2m1_values``;
  compressed-tensors ``compressors/quantized_compressors/nvfp4_quantized.py``: ``FLOAT_TO_E2M1``
  and ``abs_indices + (signbit << 3)``), i.e. exactly the float4 e2m1 bit pattern (1 sign, 2
  exponent, 1 mantissa bit, exponent bias 1, no infinities or NaN);
* packing: a ``uint8 [out, in/2]`` matrix, the even element of each pair in the **low** nibble
  (ModelOpt ``(q[..., 1::2] << 4) | q[..., 0::2]``; compressed-tensors
  ``indices[:, 0] | (indices[:, 1] << 4)``, and its unpack takes ``a & 0x0F`` first);
* block scales: ``float8_e4m3fn [out, in/16]``, one per 16 consecutive weights of a row;
* the per-tensor scale: ModelOpt stores ``weight_scale_2 = amax / (6 * 448)`` and multiplies by it
  (``dequantize``: ``scale * double_scale``); compressed-tensors stores ``weight_global_scale =
  448 * 6 / amax`` (``quantization/utils/helpers.py`` ``generate_gparam``) and divides by it
  (``quantization/lifecycle/forward.py``: ``scale = scale / global_scale``). diffgen keeps the multiplier, one fp32 per output row
  (``scale2 (E, out, 1)``), so gate and up rows of one fused matrix may carry different global
  scales (compressed-tensors quantises them as separate tensors; ModelOpt gives them one).

So ``W[n, k] = e2m1(code[n, k]) * e4m3(scale[n, k // 16]) * scale2[n]``. ``--quant nvfp4``
quantises bf16 experts into exactly this (:func:`quantize`, ModelOpt's arithmetic: global
``amax / (6 * 448)`` per expert matrix, block scales ``block_amax / (6 * global)`` rounded to e4m3,
codes rounded to the nearest magnitude with ties to the even code).

The grouped product (:func:`grouped_mm`) has the interface of :func:`diffgen.kernels.moe.grouped_mm`:
rows sorted by expert, ``ends`` the cumulative row counts, no host sync on the GPU. Paths:

* Triton (CUDA with triton, or any device under ``TRITON_INTERPRET=1``):
  :mod:`diffgen.kernels.nvfp4_triton` decodes nibbles and e4m3 scales with bit operations in
  registers (no lookup table) and multiplies each row's sum by its ``scale2`` at the end;
* torch elsewhere (the CPU, MPS): dequantise (in chunks of experts on the CPU) and multiply.

A GPU benchmark of the experts alone should call :func:`grouped_mm_nvfp4` (the Triton path,
no op dispatch) with a real-size stack from :func:`quantize`; nothing on a GPU has timed it yet.
"""

# No ``from __future__ import annotations``: torch.library reads the op's annotations as types.

import os
from typing import Optional

import torch

from diffgen.kernels import launches

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# e2m1 magnitudes by 3-bit index; bit 3 of a code is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Round-to-nearest boundaries between consecutive magnitudes (ModelOpt's ``e2m1_bounds``). A value on a
# boundary goes to the even code, as ModelOpt's ``_cast_fp4`` does (it adds one on ``e2m1_bounds[[1, 3, 5]]``,
# i.e. 0.75, 1.75 and 3.5): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# On the CPU the torch path dequantises about this many weights at a time (fp32: 4 MiB).
CPU_CHUNK_ELEMENTS = 1 << 20


def _table(device: torch.device) -> torch.Tensor:
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([values, -values])


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Values already divided by their scales -> 4-bit codes (uint8, one per value): nearest
    magnitude (saturating at 6), ties to the even code, sign in bit 3."""
    bounds = torch.tensor(E2M1_BOUNDS, dtype=torch.float32, device=x.device)
    magnitude = x.abs().float()
    index = torch.searchsorted(bounds, magnitude.contiguous(), out_int32=True)
    on_odd_bound = (magnitude.unsqueeze(-1) == bounds[[1, 3, 5]]).any(dim=-1)
    index = (index + on_odd_bound.to(torch.int32)).clamp(max=7).to(torch.uint8)
    return index | (torch.signbit(x).to(torch.uint8) << 3)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """``(..., in)`` codes -> ``(..., in/2)`` bytes, the even element in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """``(..., in/2)`` bytes -> ``(..., in)`` codes (low nibble first)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


@torch.no_grad()
def quantize(weight: torch.Tensor, global_scale: Optional[torch.Tensor] = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``(out, in)`` matrix -> ``(packed uint8 (out, in/2), scale e4m3 (out, in/16),
    scale2 fp32 ())`` with ``W ~= e2m1 * scale * scale2`` (ModelOpt's dynamic NVFP4 arithmetic).

    ``global_scale``: the multiplier to use (default ``amax / (6 * 448)``, one for the matrix).
    """
    out_dim, in_dim = weight.shape
    if in_dim % BLOCK:
        raise ValueError(f"nvfp4 needs rows whose length is a multiple of {BLOCK} (got {in_dim})")
    weight = weight.float()
    if global_scale is None:
        global_scale = weight.abs().amax() / (E2M1_MAX * E4M3_MAX)
        global_scale = torch.where(global_scale > 0, global_scale, torch.ones_like(global_scale))
    global_scale = global_scale.float().reshape(())
    blocks = weight.view(out_dim, in_dim // BLOCK, BLOCK)
    block_scale = blocks.abs().amax(dim=-1) / (E2M1_MAX * global_scale)
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    scale = block_scale.clamp(min=2.0**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = blocks / (scale.float() * global_scale).unsqueeze(-1)
    packed = pack(e2m1_codes(scaled.view(out_dim, in_dim)))
    return packed, scale, global_scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor, n: int, k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Stacked matrices ``(c, n, k)`` in ``dtype`` from ``c`` stored ones: ``q`` ``(c, n, k/2)``,
    ``scale`` ``(c, n, k/16)`` e4m3, ``scale2`` ``(c, n, 1)`` fp32 (the reference the kernel is tested
    against; a table lookup is fine here)."""
    count = q.shape[0]
    values = _table(q.device)[unpack(q).long()].view(count, n, k // BLOCK, BLOCK)
    values.mul_(scale.float().unsqueeze(-1))
    return values.view(count, n, k).mul_(scale2).to(dtype)


# -- the grouped product ------------------------------------------------------------------------------


def triton_runs(device_type: str) -> bool:
    """Whether the Triton kernel runs for tensors on ``device_type`` (CUDA with triton, or any
    device under ``TRITON_INTERPRET=1``)."""
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from diffgen.kernels import nvfp4_triton  # noqa: F401
    except Exception:  # noqa: BLE001 - triton missing or broken
        return False
    return True


def kernel_config(rows: int, experts: int, n: int, k: int) -> dict[str, int]:
    """Tiles from static shapes only (never from the routing): ``BLOCK_M`` about twice the mean
    rows per expert (256 tokens x top-8 over 128 experts: 16 rows, one row tile, so each weight
    byte is read once), ``BLOCK_K`` 64 weights (32 bytes and 4 scales per row), one program per
    ``BLOCK_N`` output rows of one expert. Untimed on a GPU so far: a first choice, not a tuned one."""
    mean = -(-rows // max(experts, 1))
    block_m = 16 if mean <= 8 else 32 if mean <= 16 else 64
    m_split = 1 if experts > 1 else max(1, min(64, -(-rows // block_m)))
    block_k = 64 if k % 64 == 0 else 32 if k % 32 == 0 else 16
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": block_k, "M_SPLIT": m_split, "num_warps": 4,
            "num_stages": 3}


def grouped_mm_nvfp4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor,
                     ends: torch.Tensor, n: int, k: int, config: Optional[dict] = None) -> torch.Tensor:
    """The Triton path: ``x`` ``(S, k)`` rows sorted by expert times each expert's NVFP4 ``(n, k)``
    matrix, transposed -> ``(S, n)`` in ``x``'s dtype (fp32 accumulation). Grid and tiles from
    static sizes only: no host sync, so CUDA graphs capture it."""
    from diffgen.kernels.nvfp4_triton import grouped_nvfp4_kernel

    experts, rows = q.shape[0], x.shape[0]
    x = x.contiguous()
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0:
        return out
    cfg = {**kernel_config(rows, experts, n, k), **(config or {})}
    grid = (cfg["M_SPLIT"], -(-n // cfg["BLOCK_N"]), experts)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    with launches.launch("grouped_nvfp4"):
        grouped_nvfp4_kernel[grid](
            x, q, scale.view(torch.uint8), scale2, ends, out, n, k, cfg["M_SPLIT"],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            F32_DOT=x.dtype == torch.float32 or interpreted, EVEN_K=k % cfg["BLOCK_K"] == 0,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out


def grouped_mm_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor,
                     ends: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The torch path: dequantise and multiply each expert's rows by its matrix (on the CPU in
    chunks of experts, reading ``ends`` on the host, which is free there; elsewhere the whole
    stack at once and one product per expert from device offsets)."""
    experts = q.shape[0]
    if experts == 1:
        return torch.nn.functional.linear(x, dequantize(q, scale, scale2, n, k, x.dtype)[0])
    out = x.new_empty(x.shape[0], n)
    per_chunk = max(1, CPU_CHUNK_ELEMENTS // (n * k)) if x.device.type == "cpu" else experts
    bounds = [0, *ends.tolist()]
    for first in range(0, experts, per_chunk):
        last = min(experts, first + per_chunk)
        if bounds[last] == bounds[first]:
            continue
        weights = dequantize(q[first:last], scale[first:last], scale2[first:last], n, k, x.dtype)
        for expert in range(first, last):
            low, high = bounds[expert], bounds[expert + 1]
            if high > low:
                out[low:high] = torch.nn.functional.linear(x[low:high], weights[expert - first])
    return out


@torch.library.custom_op("diffgen::grouped_mm_nvfp4", mutates_args=())
def _grouped_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor, ends: torch.Tensor,
                n: int, k: int, backend: str) -> torch.Tensor:
    if backend == "auto":
        backend = "triton" if triton_runs(x.device.type) else "torch"
    if backend == "triton":
        return grouped_mm_nvfp4(x, q, scale, scale2, ends, n, k)
    return grouped_mm_torch(x, q, scale, scale2, ends, n, k)


@_grouped_op.register_fake
def _grouped_fake(x, q, scale, scale2, ends, n, k, backend):
    return x.new_empty((x.shape[0], n))


def grouped_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor, ends: torch.Tensor,
               n: int, k: int, backend: str = "auto") -> torch.Tensor:
    """Grouped NVFP4 product (a ``torch.library`` custom op, so ``torch.compile`` traces around it):
    ``backend`` ``"auto"`` (Triton where :func:`triton_runs`, else torch), ``"triton"`` or ``"torch"``."""
    return _grouped_op(x, q, scale, scale2, ends, n, k, backend)
