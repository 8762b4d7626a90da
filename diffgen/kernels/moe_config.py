"""The grouped kernels' switches (environment, read at each call) and tile sizes (static shapes only).

Switches: ``DIFFGEN_MOE_CONFIG`` (:func:`config_mode`), ``DIFFGEN_MOE_EPILOGUE``
(:func:`epilogue_mode`), ``DIFFGEN_FP8_SCALED`` (:func:`fp8_scaled_enabled`) and
``DIFFGEN_MOE_TUNE`` (:func:`tune_overrides`). Tiles: :func:`kernel_config` (the legacy kernel)
and :func:`tuned_config` (the tuned one), never from the routing.
"""

import functools
import os

from diffgen.kernels.expert_formats import kernel_format
from diffgen.planning.sizes import NF4_BLOCK


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
    the card's ``limits`` (:func:`~diffgen.kernels.capability.device_limits`). Never from the routing.

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
