"""Grouped products over quantised expert stacks, with no host sync, so a step can be graph-captured.

A mixture-of-experts layer sends each (token, k) pair to one expert. Sorting the pairs by expert
makes every expert's rows one contiguous segment, described by ``ends`` (int32, ``ends[e]`` = the
end of expert ``e``'s rows, computed on the device by :func:`route`); one grouped product then
runs every expert at once. That is what transformers' ``grouped_mm`` experts do for bf16
weights; this module does it for diffgen's quantised stacks (formats in
:mod:`diffgen.loading.quant`):

* **Triton** (CUDA with triton, or any device under ``TRITON_INTERPRET=1``): one weight-only
  kernel for int8, fp8 and nf4 that dequantises weight tiles in registers, and for unquantised
  ``bf16`` stacks (:mod:`diffgen.kernels.moe_triton`). Its default configuration
  (``DIFFGEN_MOE_CONFIG=tuned``, read at call time; ``legacy`` selects the first kernel for A/B)
  is made for ~16 rows per expert: weights on the MMA's M side, a persistent grid, tiles from the
  static shapes and the card's limits only (:func:`tuned_config`). The experts forward
  (:func:`experts_forward`) fuses the row gather and the gated activation into the gate_up
  product and the routing weight and unpermute into the down product's epilogue
  (``DIFFGEN_MOE_EPILOGUE=unfused`` keeps the separate ops, for A/B);
* **fp8 with scaled activations** (``DIFFGEN_FP8_SCALED=1`` only, on cards with
  ``torch._scaled_grouped_mm``: compute capability 9.x / 10.x): activations quantised per row to
  e4m3 on the fly, fp8 tensor-core products with row-wise scales (:func:`fp8_scaled_grouped_mm`).
  Off by default: on an H200 it measured slower than the weight-only kernel (0.58 vs 0.45 ms a
  layer) and 7x less accurate (relative error 0.041 vs 0.006);
* **torch** elsewhere (CPU, MPS, no triton): dequantise the stack (vectorised over experts; on
  the CPU in cache-sized chunks of experts, where reading ``ends`` on the host is free) and
  call torch's grouped matmul — exact against the dequantised weights.

No library ships such a kernel yet (checked 2026-11: bitsandbytes 0.50 loops over experts and its
grouped 4-bit work is an open pull request; gemlite 0.6 has dense kernels only; torchao 0.18 has
grouped kernels for fp8/mxfp8/nvfp4 training, and for weight-only formats dequantises every expert
before a bf16 grouped matmul), hence our own.

The products are ``torch.library`` custom ops (``diffgen::grouped_mm_wo``,
``diffgen::grouped_mm_fused``), each one Triton launch (or the torch fallback): ``torch.compile``
traces around them with ``fullgraph=True`` and CUDA graphs capture their kernel launches. Every
Triton launch is reported to :mod:`diffgen.kernels.launches`.

Unquantised (bf16 / fp16 / fp32) expert stacks go through the same kernel where torch's own
``_grouped_mm`` would take its host-syncing fallback (:func:`torch_grouped_mm_is_fast`, from
torch's source), through transformers' ``grouped_mm`` experts elsewhere
(:func:`grouped_experts_forward`, registered with transformers as :data:`EXPERTS_IMPLEMENTATION`).

Adding a format: a name in :data:`FORMATS`, its kernel code in :func:`kernel_format` (and the
branch in ``moe_triton._weight_tile``), its dequantisation in :func:`dequantize`, its stored
bytes per weight in :data:`WEIGHT_BYTES`.
"""

# No ``from __future__ import annotations``: torch.library reads the op's annotations as types.

import collections
import functools
import os
from typing import Any, NamedTuple, Optional

import torch

from diffgen.kernels.launches import launch
from diffgen.planning.plan import NF4_BLOCK

FORMATS = ("int8", "fp8", "nf4", "bf16")  # "bf16": an unquantised float stack (bf16, fp16 or fp32)
# Stored bytes per weight (scales aside), for tile sizing; "bf16" stacks use their element size.
WEIGHT_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5}
# The name diffgen's bf16 experts forward is registered under in transformers' ExpertsInterface.
EXPERTS_IMPLEMENTATION = "diffgen_grouped"
FP8_MAX = 448.0
# On the CPU the torch path dequantises about this many weights at a time (fp32: 4 MiB), so each
# chunk is used while it sits in cache and its buffer is reused rather than mapped afresh (at
# least one expert per chunk). Elsewhere it dequantises the whole stack: no host reads.
CPU_CHUNK_ELEMENTS = 1 << 20
# Launch counts per path, for tests and benchmarks that must know which path ran.
LAUNCHES: collections.Counter = collections.Counter()


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


# -- dequantisation (torch) -----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def bnb_functional(device_type: str) -> Any:
    """bitsandbytes' functional module if it quantises on this device type, else ``None``."""
    import logging

    if not os.environ.get("DIFFGEN_DEBUG"):  # its CPU backend warns about an optional kernel package
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F

        probe = torch.randn(NF4_BLOCK * 2, device=device_type)
        packed, state = F.quantize_4bit(probe, blocksize=NF4_BLOCK, quant_type="nf4")
        F.dequantize_4bit(packed, state)
        return F
    except Exception:  # noqa: BLE001 - not installed, no backend for this device, ...
        return None


def dequantize(q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor], fmt: str, n: int, k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Stacked matrices ``(c, n, k)`` in ``dtype`` from ``c`` stored ones (any leading count).

    Written for the CPU's sake: a cast then an in-place multiply (mixed-dtype products take a
    slow path there); nf4 through bitsandbytes' native CPU kernel where it is installed (the
    same values, ~6x faster than torch there; no device copy: the code table is ``code``), else
    :func:`nf4_dequantize`.
    """
    count = q.shape[0]
    if fmt == "bf16":  # unquantised: the stored values
        return q.to(dtype)
    if fmt in ("int8", "fp8"):
        return q.to(torch.float32).mul_(scale).to(dtype)
    if fmt != "nf4":
        raise ValueError(f"unknown quantisation format {fmt!r}")
    # bitsandbytes' CPU kernel only where blocks never straddle rows: with k = 32 (blocks spanning two
    # rows) bitsandbytes 0.50 returns other values than its own quantiser's format (and torch's).
    bnb = bnb_functional("cpu") if q.device.type == "cpu" and k % NF4_BLOCK == 0 else None
    if bnb is None:
        return nf4_dequantize(q, scale, code, n, k, dtype)
    state = bnb.QuantState(absmax=scale.reshape(-1), shape=torch.Size((count * n, k)), code=code,
                           blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.float32)
    return bnb.dequantize_4bit(q.reshape(-1, 1), state).view(count, n, k).to(dtype)


def nf4_dequantize(q: torch.Tensor, scale: torch.Tensor, code: torch.Tensor, n: int, k: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """NF4 in torch: one ``index_select`` per byte from a 256-entry table of (high, low) nibble pairs."""
    count = q.shape[0]
    byte = torch.arange(256, device=q.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=-1)
    values = pairs.index_select(0, q.reshape(-1).to(torch.int32)).view(count, -1, NF4_BLOCK)
    return values.mul_(scale.reshape(count, -1, 1)).view(count, n, k).to(dtype)


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's grouped matmul runs here for ``dtype`` (CPU: torch >= 2.9; CUDA: bf16, sm80+)."""
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        a = torch.ones(4, 16, device=device_type, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        offs = torch.tensor([1, 4], device=device_type, dtype=torch.int32)
        fn(a, b.transpose(-2, -1), offs=offs)
        return True
    except Exception:  # noqa: BLE001 - no kernel for this device or dtype
        return False


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x`` rows sorted by group times ``w[g].T`` per group (``offs`` cumulative ends)."""
    if _grouped_mm_runs(x.device.type, x.dtype):
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        if x.data_ptr() % 16:  # CPU kernels of torch <= 2.10 want 16-byte aligned rows
            x = x.clone()
        return fn(x, w.transpose(-2, -1), offs=offs)
    # Last resort (old torch, devices without the kernel): one product per group, bounds on the host.
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[group].T, out=out[start:end])
        start = end
    return out


def grouped_mm_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor],
                     ends: torch.Tensor, fmt: str, n: int, k: int, chunk_elements: Optional[int] = None) -> torch.Tensor:
    """The torch path: dequantise (vectorised over experts, in chunks on the CPU) and run a grouped matmul.

    ``chunk_elements``: weights dequantised at a time; default :data:`CPU_CHUNK_ELEMENTS` on the
    CPU (reading ``ends`` there is free), unbounded elsewhere (no host read of ``ends``).
    """
    LAUNCHES["torch"] += 1
    experts = q.shape[0]
    if experts == 1:
        return torch.nn.functional.linear(x, dequantize(q, scale, code, fmt, n, k, x.dtype)[0])
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if x.device.type == "cpu" else experts * n * k
    per_chunk = max(1, chunk_elements // (n * k))
    if per_chunk >= experts:
        return _grouped(x, dequantize(q, scale, code, fmt, n, k, x.dtype), ends)
    bounds = [0, *ends.tolist()]
    out = x.new_empty(x.shape[0], n)
    for first in range(0, experts, per_chunk):
        last = min(experts, first + per_chunk)
        low, high = bounds[first], bounds[last]
        if high > low:
            weights = dequantize(q[first:last], scale[first:last], code, fmt, n, k, x.dtype)
            out[low:high] = _grouped(x[low:high], weights, ends[first:last] - low)
    return out


# -- Triton -----------------------------------------------------------------------------------------


_TRITON_RUNS: dict = {}


def triton_runs(device_type: str) -> bool:
    """Whether the Triton kernel can run for tensors on ``device_type``: CUDA with triton
    importable, or any device while ``TRITON_INTERPRET=1`` (the interpreter, for tests). Decided
    once per device type (a plain dict, which dynamo traces as a constant)."""
    if device_type not in _TRITON_RUNS:
        runs = device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        if runs:
            try:
                from diffgen.kernels import moe_triton  # noqa: F401
            except Exception:  # noqa: BLE001 - triton missing or broken
                runs = False
        _TRITON_RUNS[device_type] = runs
    return _TRITON_RUNS[device_type]


_PAIRS: dict = {}


def nf4_pairs(code: torch.Tensor) -> torch.Tensor:
    """The 256-entry table of (high, low) nibble values as int64 (two fp32 each), built once per
    code table (a constant: kept for the life of the process, on its device)."""
    key = (code.device, code.data_ptr())
    if key not in _PAIRS:
        byte = torch.arange(256, device=code.device)
        _PAIRS[key] = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=-1).contiguous().view(torch.int64).view(256)
    return _PAIRS[key]


def kernel_format(fmt: str, k: int) -> int:
    """The kernels' ``FMT`` code for a stack format (see :mod:`diffgen.kernels.moe_triton`)."""
    if fmt in ("int8", "fp8"):
        return 0
    if fmt == "nf4":
        return 1 if k % NF4_BLOCK == 0 else 2
    if fmt == "bf16":
        return 3
    raise ValueError(f"unknown quantisation format {fmt!r}")


def config_mode() -> str:
    """``DIFFGEN_MOE_CONFIG`` (read at each call): ``tuned`` (default) or ``legacy`` (the first
    kernel and its tiles, for A/B on a GPU)."""
    mode = os.environ.get("DIFFGEN_MOE_CONFIG", "tuned").strip().lower() or "tuned"
    if mode not in ("tuned", "legacy"):
        raise ValueError(f"DIFFGEN_MOE_CONFIG must be 'tuned' or 'legacy', not {mode!r}")
    return mode


@functools.lru_cache(maxsize=8)
def _parse_tune(text: str) -> dict[str, int]:
    import json

    values = json.loads(text)
    if not isinstance(values, dict) or not all(isinstance(v, int) for v in values.values()):
        raise ValueError(f"DIFFGEN_MOE_TUNE must be a JSON object of integers, not {text!r}")
    return values


def tune_overrides() -> dict[str, int]:
    """``DIFFGEN_MOE_TUNE`` (read at each call): a JSON object of tile overrides for the tuned
    kernel, e.g. ``{"BLOCK_M": 16, "num_stages": 3, "PROGRAMS": 1000000}`` (a ``PROGRAMS`` above
    the work items gives one program per work item: the non-persistent grid), for sweeps on a
    GPU (bench/moe_grouped.py ``--sweep``). Empty by default."""
    text = os.environ.get("DIFFGEN_MOE_TUNE", "").strip()
    return dict(_parse_tune(text)) if text else {}


def kernel_config(rows: int, experts: int, n: int, k: int, fmt: str) -> dict[str, int]:
    """Tile sizes of the legacy kernel (``DIFFGEN_MOE_CONFIG=legacy``, and one-group products such
    as the nf4-all linears) from the static shapes (never from the routing).

    ``BLOCK_M`` covers about twice the mean rows per expert so most experts take one row tile
    and read their weights once; with one "expert" (a dense layer) the row tiles are spread over
    ``M_SPLIT`` programs instead. ``BLOCK_K`` divides ``k`` where it can (unmasked, vectorised
    loads). Each program re-reads its expert's rows of ``x`` (from L2) for every ``BLOCK_N``
    columns, so a wide ``BLOCK_N`` keeps that traffic below the weight traffic. nf4 looks its
    nibbles up a byte at a time in a table of value pairs (``LUT=2``: one 8-byte gather per byte).
    Chosen from the sm_90 compilation (no spills; int8/fp8 140-168 registers, nf4 103, at 4
    warps: 3-4 programs per multiprocessor); ``bench/moe_grouped.py`` times it against the tuned
    kernel (its ``-legacy`` variants).
    """
    mean = -(-rows // max(experts, 1))
    block_m = 16 if mean <= 8 else 32 if mean <= 16 else 64
    m_split = 1 if experts > 1 else max(1, min(64, -(-rows // block_m)))
    block_k = 64 if k % 64 == 0 or fmt == "nf4" else 32 if k % 32 == 0 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 64 if fmt == "nf4" else 128, "BLOCK_K": block_k, "M_SPLIT": m_split,
            "num_warps": 4, "num_stages": 4, "LUT": 2}


@functools.lru_cache(maxsize=None)
def device_limits(device_type: str, index: Optional[int] = None) -> tuple[int, int]:
    """``(multiprocessors, shared memory a program may use in bytes)`` — static properties of the
    card. Elsewhere (the interpreter) a few programs, so the persistent loop runs several times."""
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
        smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0) or 101376
        return int(props.multi_processor_count), smem
    return 3, 232448


def _block_k(k: int, cap: int) -> int:
    """The largest power of two in [32, cap] dividing ``k`` (unmasked k loads), else 64."""
    block = cap
    while block >= 32:
        if k % block == 0:
            return block
        block //= 2
    return 64


def tuned_config(rows: int, experts: int, n: int, k: int, fmt: str, x_bytes: int = 2, w_bytes: float = 1.0,
                 limits: tuple[int, int] = (132, 232448), act: bool = False) -> dict[str, int]:
    """Tiles of :func:`diffgen.kernels.moe_triton.grouped_mm_swap_kernel` from static sizes only:
    ``rows`` (all sorted rows, T*k), ``experts``, the matrix ``(n, k)`` (with ``act``, the gate_up
    matrix: two tiles of ``BLOCK_N`` rows a work item), bytes per activation / stored weight and
    the card's ``limits`` (:func:`device_limits`). Never from the routing.

    * ``BLOCK_M`` (the token rows: the MMA's N side): about twice the mean rows per expert, so
      most experts take one row block and read each weight once (16 / 32 / 64);
    * ``BLOCK_N`` (weight rows: the MMA's M side): 128 for int8/fp8/bf16, 64 where a work item
      holds two tiles (gate and up) or dequantises nf4 in registers;
    * ``BLOCK_K``: the largest power of two dividing ``k`` up to 256 (1-byte weights, one tile a
      work item) or 128 (gate and up tiles together spill at 256 on sm_90);
    * ``num_stages``: as many pipeline stages (2-5) as the card's shared memory holds, so
      consumer cards (~99 KiB a program) get fewer than Hopper (227 KiB);
    * ``PROGRAMS``: the persistent grid, programs per multiprocessor that fit in its shared
      memory (at most 2: the sm_90 build takes 130-255 registers a thread at 4 warps) times the
      multiprocessors, never more than the work items.
    """
    sms, smem = limits
    kind = kernel_format(fmt, k)
    mean = -(-rows // max(experts, 1))
    block_m = 16 if mean <= 8 else 32 if mean <= 16 else 64
    block_n = 64 if act or kind in (1, 2) else 128
    block_k = _block_k(k, 256 if w_bytes <= 1 and kind == 0 and not act else 128)
    if kind == 1 and block_k % NF4_BLOCK:
        block_k = NF4_BLOCK
    tiles = 2 if act else 1
    stage = int(tiles * block_n * block_k * w_bytes + block_m * block_k * x_bytes)
    budget = smem - 16384  # epilogue / layout-conversion scratch
    stages = max(2, min(5, budget // max(stage, 1)))
    per_sm = max(1, min(2, smem // (stages * stage + 16384)))
    tiles_n = -(-(n // 2 if act else n) // block_n)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": stages,
            "PROGRAMS": max(1, min(experts * tiles_n, sms * per_sm)), "LUT": 2}


def grouped_mm_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor],
                      ends: torch.Tensor, fmt: str, n: int, k: int,
                      config: Optional[dict[str, int]] = None, mode: Optional[str] = None) -> torch.Tensor:
    """The Triton path, plain product (shapes and launch grid from static sizes only: no host sync).
    ``mode``: ``"tuned"`` / ``"legacy"``, default :func:`config_mode`; one-group products always
    take the legacy kernel (its row split spreads a dense layer's rows over programs)."""
    LAUNCHES["triton"] += 1
    mode = mode or config_mode()
    if mode == "tuned" and q.shape[0] > 1:
        return _launch_swap(x, None, ends, None, q, scale, code, fmt, n, k, 1, False, 0, False, config)
    from diffgen.kernels.moe_triton import grouped_wo_mm_kernel

    experts, rows = q.shape[0], x.shape[0]
    x = x.contiguous()
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0:
        return out
    kind = kernel_format(fmt, k)
    cfg = {**kernel_config(rows, experts, n, k, fmt), **(config or {})}
    if kind == 1 and cfg["BLOCK_K"] % NF4_BLOCK:
        cfg["BLOCK_K"] = NF4_BLOCK
    grid = (cfg["M_SPLIT"], -(-n // cfg["BLOCK_N"]), experts)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    code = code if code is not None else scale
    pairs = nf4_pairs(code) if kind == 1 and cfg["LUT"] == 2 else code
    with launch("grouped_wo_mm"):
        grouped_wo_mm_kernel[grid](
            x, q, scale, code, pairs, ends, out, n, k, cfg["M_SPLIT"],
            FMT=kind, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            F32_DOT=x.dtype == torch.float32 or interpreted, EVEN_K=k % cfg["BLOCK_K"] == 0, LUT=cfg["LUT"],
            RNE=interpreted and x.dtype == torch.bfloat16, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out


def _launch_swap(x: torch.Tensor, rows: Optional[torch.Tensor], ends: torch.Tensor, rw: Optional[torch.Tensor],
                 q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor], fmt: str, n: int, k: int,
                 top_k: int, gather: bool, act: int, scatter: bool,
                 config: Optional[dict[str, int]] = None) -> torch.Tensor:
    """One launch of the tuned kernel. ``x``: the sorted rows, or with ``gather`` the token rows
    (``rows``: ``perm``). Returns ``(S, n // 2 if act else n)`` in ``x``'s dtype, or with
    ``scatter`` ``(S, n)`` fp32 in (token, k) order, weighted by ``rw`` (fp32, one per pair)."""
    from diffgen.kernels.moe_triton import grouped_mm_swap_kernel

    experts = q.shape[0]
    count = rows.numel() if rows is not None else x.shape[0]
    x = x.contiguous()
    width = n // 2 if act else n
    out = torch.empty(count, width, device=x.device, dtype=torch.float32 if scatter else x.dtype)
    if count == 0:
        return out
    kind = kernel_format(fmt, k)
    w_bytes = WEIGHT_BYTES.get(fmt, q.element_size())
    cfg = {**tuned_config(count, experts, n, k, fmt, x.element_size(), w_bytes,
                          device_limits(x.device.type, x.device.index), act=bool(act)), **tune_overrides(),
           **(config or {})}
    if kind == 1 and cfg["BLOCK_K"] % NF4_BLOCK:
        cfg["BLOCK_K"] = NF4_BLOCK
    tiles_n = -(-width // cfg["BLOCK_N"])
    work = experts * tiles_n
    programs = max(1, min(work, cfg["PROGRAMS"]))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    code = code if code is not None else scale
    pairs = nf4_pairs(code) if kind == 1 and cfg["LUT"] == 2 else code
    rows_arg = rows if rows is not None else ends
    rw_arg = rw if rw is not None else scale
    name = "moe_gate_up" if act or gather else "moe_down" if scatter else "grouped_mm"
    with launch(name):
        grouped_mm_swap_kernel[(programs,)](
            x, rows_arg, q, scale, code, pairs, ends, rw_arg, out, width, k, n, tiles_n, work, programs,
            FMT=kind, BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
            F32_DOT=x.dtype == torch.float32 or interpreted, EVEN_K=k % cfg["BLOCK_K"] == 0, LUT=cfg["LUT"],
            GATHER=gather, TOP_K=top_k, ACT=act, SCATTER=scatter, RNE=interpreted and x.dtype == torch.bfloat16,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out


# -- the op -----------------------------------------------------------------------------------------


def backend_for(device: Any) -> str:
    """``"triton"`` where the Triton kernel runs for ``device``, else ``"torch"``."""
    return "triton" if triton_runs(torch.device(device).type) else "torch"


def fp8_scaled_enabled() -> bool:
    """``DIFFGEN_FP8_SCALED=1`` (read at each call): fp8 stacks use ``torch._scaled_grouped_mm``
    where it runs instead of the weight-only kernel (the default)."""
    return os.environ.get("DIFFGEN_FP8_SCALED", "").strip().lower() in ("1", "true", "yes", "on")


def epilogue_mode() -> str:
    """``DIFFGEN_MOE_EPILOGUE`` (read at each call): ``fused`` (default: gather and activation in
    the gate_up kernel, routing weight and unpermute in the down kernel's epilogue) or
    ``unfused`` (separate torch ops between plain grouped products, for A/B)."""
    mode = os.environ.get("DIFFGEN_MOE_EPILOGUE", "fused").strip().lower() or "fused"
    if mode not in ("fused", "unfused"):
        raise ValueError(f"DIFFGEN_MOE_EPILOGUE must be 'fused' or 'unfused', not {mode!r}")
    return mode


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
    :data:`FORMATS`. ``backend``: ``"auto"`` (Triton where :func:`triton_runs`, else torch; fp8 x
    fp8 first where ``fp8_activations`` and :func:`fp8_scaled_runs`), ``"triton"`` or ``"torch"``
    (both weight-only). ``fp8_activations`` defaults to :func:`fp8_scaled_enabled` (off). The
    choice is made inside the op, at run time, so compiled graphs hold no device checks.
    """
    if fp8_activations is None:
        fp8_activations = fp8_scaled_enabled()
    return _grouped_mm_op(x, q, scale, code, ends, fmt, n, k, backend, fp8_activations)


@torch.library.custom_op("diffgen::grouped_mm_fused", mutates_args=())
def _grouped_mm_fused_op(x: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, rw: Optional[torch.Tensor],
                         q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor], fmt: str, n: int, k: int,
                         top_k: int, gather: bool, act: int, scatter: bool) -> torch.Tensor:
    LAUNCHES["triton"] += 1
    return _launch_swap(x, rows, ends, rw, q, scale, code, fmt, n, k, top_k, gather, act, scatter)


@_grouped_mm_fused_op.register_fake
def _grouped_mm_fused_fake(x, rows, ends, rw, q, scale, code, fmt, n, k, top_k, gather, act, scatter):
    return x.new_empty((rows.shape[0], n // 2 if act else n), dtype=torch.float32 if scatter else x.dtype)


@torch.library.custom_op("diffgen::sum_pairs", mutates_args=())
def _sum_pairs_op(pairs: torch.Tensor, like: torch.Tensor, top_k: int) -> torch.Tensor:
    """``(T*k, H)`` fp32 rows in (token, k) order summed over k in order, as ``(T, H)`` in
    ``like``'s dtype: one Triton launch (the sum and the cast)."""
    from diffgen.kernels.moe_triton import sum_pairs_kernel

    hidden = pairs.shape[-1]
    tokens = pairs.shape[0] // max(top_k, 1)
    out = torch.empty(tokens, hidden, device=pairs.device, dtype=like.dtype)
    if tokens == 0:
        return out
    block = min(1024, triton_next_power_of_2(hidden))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    with launch("moe_sum_pairs"):
        sum_pairs_kernel[(tokens, -(-hidden // block))](pairs, out, hidden, TOP_K=top_k, BLOCK_H=block,
                                                        RNE=interpreted and like.dtype == torch.bfloat16)
    return out


@_sum_pairs_op.register_fake
def _sum_pairs_fake(pairs, like, top_k):
    return like.new_empty((pairs.shape[0] // max(top_k, 1), pairs.shape[-1]))


def triton_next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


# -- the experts forward ------------------------------------------------------------------------------


class Stack(NamedTuple):
    """What the kernels need of one expert stack: ``q`` (quantised values, or the float weights for
    ``"bf16"``), ``scale``, ``code`` (nf4's table), ``fmt``, and the matrices' ``(n, k)``."""

    q: torch.Tensor
    scale: torch.Tensor
    code: Optional[torch.Tensor]
    fmt: str
    n: int
    k: int


def activation_kind(act_fn: Any) -> int:
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


def fused_runs(device: Any, gate_up: Stack, down: Stack, backend: str = "auto") -> bool:
    """Whether :func:`experts_forward` takes the fused kernels: Triton for this device and backend,
    the tuned config and the fused epilogue selected (environment, read at call time)."""
    if backend == "torch" or (backend == "auto" and backend_for(device) != "triton"):
        return False
    if gate_up.q.shape[0] < 2 or config_mode() != "tuned" or epilogue_mode() != "fused":
        return False
    return gate_up.n % 2 == 0


def experts_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    gate_up: Stack, down: Stack, act_fn: Any, backend: str = "auto",
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


# -- fp8 x fp8 with scales ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_scaled_runs(device: Any, dtype: torch.dtype, n: int, k: int) -> bool:
    """Whether :func:`fp8_scaled_grouped_mm` runs: CUDA compute capability 9.0 or 10.0 (torch's
    row-wise fp8 grouped kernels), bf16 activations (its only output dtype), ``n`` and ``k``
    multiples of 16 (its alignment)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip or dtype != torch.bfloat16 or n % 16 or k % 16:
        return False
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False
    capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return capability == (9, 0) or capability == (10, 0)


def fp8_scaled_grouped_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """fp8 x fp8 grouped product: ``x`` (bf16, sorted rows) quantised per row to e4m3 with an fp32
    scale ``absmax / 448``, times ``q`` ``(E, n, k)`` e4m3 with its per-output-row ``scale``
    ``(E, n, 1)``, through ``torch._scaled_grouped_mm`` (bf16 out)."""
    LAUNCHES["fp8_scaled"] += 1
    row_scale = x.abs().amax(dim=-1).to(torch.float32).clamp(min=1e-12) / FP8_MAX
    xq = (x.to(torch.float32) / row_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_grouped_mm(xq, q.transpose(-2, -1), row_scale, scale.squeeze(-1), offs=ends,
                                    out_dtype=torch.bfloat16)


# -- bf16 experts: torch's grouped_mm where it is fast, the Triton kernel where it would sync ---------------


def torch_grouped_mm_is_fast(device: Any, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch's ``_grouped_mm`` / ``F.grouped_mm`` runs its grouped kernel on ``device``
    for ``dtype`` (no device-to-host sync, graph-capturable), rather than failing or taking its
    fallback. Read from torch's source (aten/src/ATen/native/cuda/GroupedBlas.cpp,
    ``_grouped_mm_cuda``):

    * torch 2.6, 2.7: no ``_grouped_mm`` at all;
    * torch 2.8 (native/cuda/Blas.cpp): refuses unless compute capability major == 9
      ("only supported on CUDA devices with compute capability = 9.0");
    * torch 2.9 to 2.13: ``use_fast_path = _scaled_mm_allowed_device(sm90_only=true,
      sm100_only=true) && a, b and out are bf16``, i.e. ``major == 9 || major == 10`` (from 2.12
      the same test is ``scaled_mm_arch_allowed``); anything else calls ``_grouped_mm_fallback``
      (native/GroupedMMUtils.h: ``offs.cpu()`` — the host sync — then one ``mm_out`` per group).
      So fp16/fp32 always, and cc 8.x (A100, RTX 30xx/40xx), 11.x, 12.x (RTX 50xx, DGX Spark) fall
      back (pytorch issue 194227). torch's main branch adds a cuBLASLt grouped GEMM for builds with
      CUDA >= 13.3 on majors 9-11 (fp16, bf16 only when ``preferCublasltGroupedGemm``), which does
      not change the answer for consumer cards and is not relied on here;
    * ROCm: only gfx942/gfx950 with CK (not modelled: ``False``).

    On the CPU torch's kernel (torch >= 2.9) runs without any device to sync with: ``True``.
    """
    device = torch.device(device)
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    if device.type == "cpu":
        return _grouped_mm_runs("cpu", dtype)
    if device.type != "cuda" or torch.version.hip or dtype != torch.bfloat16:
        return False
    major = _capability(device.index if device.index is not None else torch.cuda.current_device())[0]
    return major in (9, 10)


def bf16_experts_backend(device: Any, dtype: torch.dtype) -> str:
    """How unquantised experts run on ``device``: ``"triton"`` (diffgen's kernel, 5 kernels a layer
    with the routing weight and unpermute in its epilogue) wherever Triton runs, else ``"torch"``
    (transformers' ``grouped_mm`` experts, about 17 kernels a layer). On cards where torch's
    grouped_mm would take its host-sync fallback (:func:`torch_grouped_mm_is_fast`) the Triton
    kernel is the only capturable path; on compute capability 9.x/10.x both run, and
    ``DIFFGEN_BF16_EXPERTS=torch`` (read at call time; ``triton`` forces the other way) is the A/B
    that ``bench/gpu_session.py`` measures."""
    device = torch.device(device)
    forced = os.environ.get("DIFFGEN_BF16_EXPERTS", "auto").strip().lower() or "auto"
    if forced not in ("auto", "triton", "torch"):
        raise ValueError(f"DIFFGEN_BF16_EXPERTS must be 'auto', 'triton' or 'torch', not {forced!r}")
    if forced == "torch" or not triton_runs(device.type) or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "torch"
    return "triton"


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


def grouped_experts_forward(module: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward for unquantised stacks (``module``: a ``@use_experts_implementation``
    experts module with ``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``): diffgen's
    fused Triton experts (the "bf16" format) where :func:`bf16_experts_backend` says so, else
    transformers' own ``grouped_mm`` experts. Registered as :data:`EXPERTS_IMPLEMENTATION`."""
    gate_up, down = module.gate_up_proj, module.down_proj
    simple = (not getattr(module, "has_bias", False) and getattr(module, "has_gate", True)
              and not getattr(module, "is_transposed", False) and not getattr(module, "has_post_expert_norm", False)
              and getattr(module, "is_concatenated", True) and not getattr(module, "_is_expert_parallel", False))
    if (simple and gate_up.dtype == down.dtype == hidden_states.dtype and gate_up.is_contiguous()
            and down.is_contiguous() and bf16_experts_backend(gate_up.device, gate_up.dtype) == "triton"):
        experts, two_inter, hidden = gate_up.shape
        return experts_forward(hidden_states, top_k_index, top_k_weights,
                               Stack(gate_up, gate_up, None, "bf16", two_inter, hidden),
                               Stack(down, down, None, "bf16", hidden, two_inter // 2),
                               module.act_fn, backend="triton", boundaries=boundaries(experts, gate_up.device))
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> Optional[str]:
    """Register :func:`grouped_experts_forward` with transformers and return its name (``None``
    where this transformers has no experts interface: its default experts then)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return None
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, grouped_experts_forward)
    return EXPERTS_IMPLEMENTATION
