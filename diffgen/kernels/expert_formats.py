"""The expert stack formats: their names, stored bytes, kernel codes and dequantisation (torch).

Formats of diffgen's quantised stacks (:mod:`diffgen.loading.quant`): ``int8`` and ``fp8`` (one
scale per output row), ``nf4`` (blocks of :data:`~diffgen.planning.sizes.NF4_BLOCK` weights with
an absmax each, decoded through a 16-entry code table) and ``bf16`` (an unquantised float stack).
Adding a format: a name in :data:`FORMATS`, its kernel code in :func:`kernel_format` (and the
branch in ``moe_triton._weight_tile``), its dequantisation in :func:`dequantize`, its stored
bytes per weight in :data:`WEIGHT_BYTES`.
"""

# No ``from __future__ import annotations``: like the custom ops', these annotations stay types.

import functools
import os
from typing import Any, NamedTuple, Optional

import torch

from diffgen.planning.sizes import NF4_BLOCK

FORMATS = ("int8", "fp8", "nf4", "bf16")  # "bf16": an unquantised float stack (bf16, fp16 or fp32)
# Stored bytes per weight (scales aside), for tile sizing; "bf16" stacks use their element size.
WEIGHT_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5}


class Stack(NamedTuple):
    """What the kernels need of one expert stack: ``q`` (quantised values, or the float weights for
    ``"bf16"``), ``scale``, ``code`` (nf4's table), ``fmt``, and the matrices' ``(n, k)``."""

    q: torch.Tensor
    scale: torch.Tensor
    code: Optional[torch.Tensor]
    fmt: str
    n: int
    k: int


def kernel_format(fmt: str, k: int) -> int:
    """The kernels' ``FMT`` code for a stack format (see :mod:`diffgen.kernels.moe_triton`)."""
    if fmt in ("int8", "fp8"):
        return 0
    if fmt == "nf4":
        return 1 if k % NF4_BLOCK == 0 else 2
    if fmt == "bf16":
        return 3
    raise ValueError(f"unknown quantisation format {fmt!r}")


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


_PAIRS: dict = {}


def nf4_pairs(code: torch.Tensor) -> torch.Tensor:
    """The 256-entry table of (high, low) nibble values as int64 (two fp32 each), built once per
    code table (a constant: kept for the life of the process, on its device)."""
    key = (code.device, code.data_ptr())
    if key not in _PAIRS:
        byte = torch.arange(256, device=code.device)
        _PAIRS[key] = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=-1).contiguous().view(torch.int64).view(256)
    return _PAIRS[key]
