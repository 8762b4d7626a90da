"""Grouped products over quantised expert stacks, with no host sync, so a step can be graph-captured.

A mixture-of-experts layer sends each (token, k) pair to one expert. Sorting the pairs by expert
makes every expert's rows one contiguous segment, described by ``ends`` (int32, ``ends[e]`` = the
end of expert ``e``'s rows, computed on the device by :func:`route`); one grouped product then
runs every expert at once. That is what transformers' ``grouped_mm`` experts do for bf16
weights; this module does it for diffgen's quantised stacks (formats in
:mod:`diffgen.kernels.expert_formats`, stacks in :mod:`diffgen.loading.quant`):

* **Triton** (CUDA with triton, or any device under ``TRITON_INTERPRET=1``): one weight-only
  kernel for int8, fp8 and nf4 that dequantises weight tiles in registers, and for unquantised
  ``bf16`` stacks (:mod:`diffgen.kernels.moe_triton`). Its default configuration
  (``DIFFGEN_MOE_CONFIG=tuned``, read at call time; ``legacy`` selects the first kernel for A/B)
  is made for ~16 rows per expert: weights on the MMA's M side, a persistent grid, tiles from the
  static shapes and the card's limits only (:mod:`diffgen.kernels.moe_config`, launched by
  :mod:`diffgen.kernels.moe_launch`). The experts forward
  (:func:`experts_forward`) fuses the row gather and the gated activation into the gate_up
  product and the routing weight and unpermute into the down product's epilogue
  (``DIFFGEN_MOE_EPILOGUE=unfused`` keeps the separate ops, for A/B);
* **fp8 with scaled activations** (``DIFFGEN_FP8_SCALED=1`` only, on cards with
  ``torch._scaled_grouped_mm``: compute capability 9.x / 10.x): activations quantised per row to
  e4m3 on the fly, fp8 tensor-core products with row-wise scales
  (:func:`diffgen.kernels.grouped_torch.fp8_scaled_grouped_mm`).
  Off by default: on an H200 it measured slower than the weight-only kernel (0.58 vs 0.45 ms a
  layer) and 7x less accurate (relative error 0.041 vs 0.006);
* **torch** elsewhere (CPU, MPS, no triton): dequantise the stack (vectorised over experts; on
  the CPU in cache-sized chunks of experts, where reading ``ends`` on the host is free) and
  call torch's grouped matmul — exact against the dequantised weights
  (:mod:`diffgen.kernels.grouped_torch`).

No library ships such a kernel yet (checked 2026-11: bitsandbytes 0.50 loops over experts and its
grouped 4-bit work is an open pull request; gemlite 0.6 has dense kernels only; torchao 0.18 has
grouped kernels for fp8/mxfp8/nvfp4 training, and for weight-only formats dequantises every expert
before a bf16 grouped matmul), hence our own.

The products are ``torch.library`` custom ops (``diffgen::grouped_mm_wo``,
``diffgen::grouped_mm_fused``), each one Triton launch (or the torch fallback): ``torch.compile``
traces around them with ``fullgraph=True`` and CUDA graphs capture their kernel launches. Every
Triton launch is reported to :mod:`diffgen.kernels.launches`.

Unquantised (bf16 / fp16 / fp32) expert stacks go through the same kernel where torch's own
``_grouped_mm`` would take its host-syncing fallback
(:func:`diffgen.kernels.capability.torch_grouped_mm_is_fast`, from torch's source), through
transformers' ``grouped_mm`` experts elsewhere (:mod:`diffgen.kernels.bf16_experts`).

This module holds the routing, the custom ops and the choice of path; each path counts its calls
in :data:`diffgen.kernels.launches.GROUPED_PATHS`. Adding a format: see
:mod:`diffgen.kernels.expert_formats`.
"""

# No ``from __future__ import annotations``: torch.library reads the op's annotations as types.

import functools
from collections.abc import Callable
from typing import Optional

import torch

from diffgen.kernels.capability import fp8_scaled_runs, triton_runs
from diffgen.kernels.expert_formats import Stack
from diffgen.kernels.grouped_torch import fp8_scaled_grouped_mm, grouped_mm_torch
from diffgen.kernels.launches import GROUPED_PATHS
from diffgen.kernels.moe_config import config_mode, epilogue_mode, fp8_scaled_enabled
from diffgen.kernels.moe_launch import grouped_mm_triton, launch_swap, sum_pairs


# -- routing ---------------------------------------------------------------------------------------


def route(top_k_index: torch.Tensor, experts: int,
          boundaries: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, k) pairs by expert, on the device.

    Returns ``(perm, ends)``: ``perm`` (int64, ``T*k``) lists the pair positions in expert order
    (stable, so a token's pairs keep their order), and ``ends`` (int32, ``experts``) the cumulative
    row count per expert — ``searchsorted`` on the sorted ids, so no histogram on the host and no
    data-dependent shape. ``boundaries``: ``arange(experts)`` on the device and in the ids' dtype,
    kept by the caller so that routing costs two kernels (sort, searchsorted) rather than three.
    """
    ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    if boundaries is None or boundaries.dtype != sorted_ids.dtype or boundaries.device != ids.device:
        boundaries = torch.arange(experts, device=ids.device, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, boundaries, right=True, out_int32=True)
    return perm, ends


def combine(out: torch.Tensor, top_k_weights: torch.Tensor, perm: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """Per token, the sum of its ``k`` expert outputs times their routing weights.

    ``out`` holds the expert outputs in sorted order (row ``r`` belongs to pair ``perm[r]``);
    the products are taken in the weights' dtype (fp32 from the router, as transformers does) and
    summed in it. ``accumulate``: one ``index_add_`` (sequential, hence deterministic, on the
    CPU); otherwise scatter back to (token, k) order and sum, which stays deterministic where
    ``index_add_`` would race (CUDA atomics).
    """
    tokens, top_k = top_k_weights.shape
    weighted = out * top_k_weights.reshape(-1)[perm, None]
    if accumulate:
        final = torch.zeros(tokens, out.shape[-1], dtype=weighted.dtype, device=out.device)
        return final.index_add_(0, perm // top_k, weighted)
    unsorted = torch.empty_like(weighted).index_copy_(0, perm, weighted)
    return unsorted.view(tokens, top_k, -1).sum(dim=1)


_BOUNDARIES: dict = {}


def boundaries(experts: int, device: torch.device) -> Optional[torch.Tensor]:
    """``arange(experts)`` (int64) kept per device, made outside any graph capture (else ``None``:
    :func:`route` makes it)."""
    key = (device, experts)
    if key not in _BOUNDARIES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _BOUNDARIES[key] = torch.arange(experts, device=device, dtype=torch.int64)
    return _BOUNDARIES[key]


# -- the ops ----------------------------------------------------------------------------------------


def backend_for(device: torch.device | str) -> str:
    """``"triton"`` where the Triton kernel runs for ``device``, else ``"torch"``."""
    return "triton" if triton_runs(torch.device(device).type) else "torch"


@torch.library.custom_op("diffgen::grouped_mm_wo", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor],
                   ends: torch.Tensor, fmt: str, n: int, k: int, backend: str, fp8_activations: bool) -> torch.Tensor:
    if backend == "auto":
        if fmt == "fp8" and fp8_activations and fp8_scaled_runs(x.device, x.dtype, n, k):
            return fp8_scaled_grouped_mm(x, q, scale, ends)
        backend = backend_for(x.device)
    if backend == "triton":
        return grouped_mm_triton(x, q, scale, code, ends, fmt, n, k)
    return grouped_mm_torch(x, q, scale, code, ends, fmt, n, k)


@_grouped_mm_op.register_fake
def _grouped_mm_fake(x, q, scale, code, ends, fmt, n, k, backend, fp8_activations):
    return x.new_empty((x.shape[0], n))


def grouped_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor],
               ends: torch.Tensor, fmt: str, n: int, k: int, backend: str = "auto",
               fp8_activations: Optional[bool] = None) -> torch.Tensor:
    """Grouped product: row ``r`` of ``x`` (``(S, k)``, sorted by expert, expert ``e`` owning rows
    ``[ends[e-1], ends[e])``) times expert ``e``'s ``(n, k)`` matrix, transposed. Returns
    ``(S, n)`` in ``x``'s dtype, accumulated in fp32.

    ``q``/``scale``/``code`` are a stack's buffers (:class:`diffgen.loading.quant.QuantizedStack`;
    for ``"bf16"`` ``q`` is the float stack and ``scale`` any tensor), ``fmt`` one of
    :data:`~diffgen.kernels.expert_formats.FORMATS`. ``backend``: ``"auto"`` (Triton where
    :func:`~diffgen.kernels.capability.triton_runs`, else torch; fp8 x fp8 first where
    ``fp8_activations`` and :func:`~diffgen.kernels.capability.fp8_scaled_runs`), ``"triton"`` or
    ``"torch"`` (both weight-only). ``fp8_activations`` defaults to
    :func:`~diffgen.kernels.moe_config.fp8_scaled_enabled` (off). The
    choice is made inside the op, at run time, so compiled graphs hold no device checks.
    """
    if fp8_activations is None:
        fp8_activations = fp8_scaled_enabled()
    return _grouped_mm_op(x, q, scale, code, ends, fmt, n, k, backend, fp8_activations)


@torch.library.custom_op("diffgen::grouped_mm_fused", mutates_args=())
def _grouped_mm_fused_op(x: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, rw: Optional[torch.Tensor],
                         q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor], fmt: str, n: int, k: int,
                         top_k: int, gather: bool, act: int, scatter: bool) -> torch.Tensor:
    GROUPED_PATHS["triton"] += 1
    return launch_swap(x, rows, ends, rw, q, scale, code, fmt, n, k, top_k, gather, act, scatter)


@_grouped_mm_fused_op.register_fake
def _grouped_mm_fused_fake(x, rows, ends, rw, q, scale, code, fmt, n, k, top_k, gather, act, scatter):
    return x.new_empty((rows.shape[0], n // 2 if act else n), dtype=torch.float32 if scatter else x.dtype)


@torch.library.custom_op("diffgen::sum_pairs", mutates_args=())
def _sum_pairs_op(pairs: torch.Tensor, like: torch.Tensor, top_k: int) -> torch.Tensor:
    """``(T*k, H)`` fp32 rows in (token, k) order summed over k in order, as ``(T, H)`` in
    ``like``'s dtype: one Triton launch (the sum and the cast)."""
    return sum_pairs(pairs, like, top_k)


@_sum_pairs_op.register_fake
def _sum_pairs_fake(pairs, like, top_k):
    return like.new_empty((pairs.shape[0] // max(top_k, 1), pairs.shape[-1]))


# -- the experts forward ------------------------------------------------------------------------------


def activation_kind(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """The kernel's ``ACT`` code for an activation module or function: 1 GELU with the tanh
    approximation (Gemma's ``gelu_pytorch_tanh``), 2 exact GELU, 3 SiLU; 0 for anything else (the
    activation then runs in torch between the products)."""
    fn = getattr(act_fn, "act", act_fn)  # transformers' activation modules wrap a function
    approximate = None
    if isinstance(fn, functools.partial) and fn.func is torch.nn.functional.gelu and not fn.args:
        approximate = fn.keywords.get("approximate", "none")
    elif fn is torch.nn.functional.gelu:
        approximate = "none"
    elif isinstance(fn, torch.nn.GELU):
        approximate = fn.approximate
    if approximate is not None:
        return {"tanh": 1, "none": 2}.get(approximate, 0)
    if fn is torch.nn.functional.silu or isinstance(fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return 3
    return 0


def fused_runs(device: torch.device | str, gate_up: Stack, down: Stack, backend: str = "auto") -> bool:
    """Whether :func:`experts_forward` takes the fused kernels: Triton for this device and backend,
    the tuned config and the fused epilogue selected (environment, read at call time)."""
    if backend == "torch" or (backend == "auto" and backend_for(device) != "triton"):
        return False
    if gate_up.q.shape[0] < 2 or config_mode() != "tuned" or epilogue_mode() != "fused":
        return False
    return gate_up.n % 2 == 0


def experts_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    gate_up: Stack, down: Stack, act_fn: Callable[[torch.Tensor], torch.Tensor],
                    backend: str = "auto",
                    fp8_activations: Optional[bool] = None,
                    boundaries: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every token through its top-k experts, weighted and summed, as transformers' experts:
    ``(T, H)``, ``(T, k)``, ``(T, k)`` -> ``(T, H)`` in ``hidden_states``' dtype. No host sync.

    Fused (:func:`fused_runs`): route (sort, searchsorted), one gate_up kernel that gathers each
    sorted row's token itself and writes ``act(gate) * up``, one down kernel that multiplies each
    row by its routing weight and writes it to its (token, k) slot in fp32, and one kernel that
    sums the k slots in order and casts — five kernels, the arithmetic of transformers'
    ``grouped_mm`` experts (products rounded to the activations' dtype, weighted and summed in
    fp32: deterministic, no atomics).
    Otherwise the separate ops: gather, two grouped products (:func:`grouped_mm`), activation,
    :func:`combine`.
    """
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    tokens, top_k = top_k_index.shape[0], top_k_index.shape[-1]
    experts = gate_up.q.shape[0]
    perm, ends = route(top_k_index, experts, boundaries)
    if fp8_activations is None:
        fp8_activations = fp8_scaled_enabled()
    scaled = gate_up.fmt == "fp8" and fp8_activations and fp8_scaled_runs(flat.device, flat.dtype, gate_up.n, gate_up.k)
    if not scaled and fused_runs(flat.device, gate_up, down, backend):
        act = activation_kind(act_fn)
        weights = top_k_weights.reshape(-1)
        if weights.dtype != torch.float32:
            weights = weights.float()
        h = _grouped_mm_fused_op(flat, perm, ends, None, gate_up.q, gate_up.scale, gate_up.code, gate_up.fmt,
                                 gate_up.n, gate_up.k, top_k, True, act, False)
        if not act:
            gate, up = h.chunk(2, dim=-1)
            h = act_fn(gate) * up
        pairs = _grouped_mm_fused_op(h, perm, ends, weights, down.q, down.scale, down.code, down.fmt, down.n, down.k,
                                     top_k, False, 0, True)
        return _sum_pairs_op(pairs, flat, top_k).view(shape)
    gate, up = grouped_mm(flat[perm // top_k], *gate_up[:3], ends, gate_up.fmt, gate_up.n, gate_up.k, backend,
                          fp8_activations).chunk(2, dim=-1)
    out = grouped_mm(act_fn(gate) * up, *down[:3], ends, down.fmt, down.n, down.k, backend, fp8_activations)
    out = combine(out, top_k_weights, perm, accumulate=flat.device.type == "cpu")
    return out.to(hidden_states.dtype).view(shape)
