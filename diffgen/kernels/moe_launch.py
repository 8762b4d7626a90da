"""Launchers of :mod:`diffgen.kernels.moe_triton`'s kernels: shapes and grids from static sizes only.

Each launch is wrapped in :func:`diffgen.kernels.launches.launch` (which counts it) and allocates
its output first; no host sync, so a step holding them can be graph-captured.
"""

import os
from typing import Optional

import torch

from diffgen.kernels.capability import device_limits
from diffgen.kernels.expert_formats import WEIGHT_BYTES, kernel_format, nf4_pairs
from diffgen.kernels.launches import GROUPED_PATHS, launch
from diffgen.kernels.moe_config import config_mode, kernel_config, tune_overrides, tuned_config
from diffgen.planning.sizes import NF4_BLOCK


def grouped_mm_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor],
                      ends: torch.Tensor, fmt: str, n: int, k: int,
                      config: Optional[dict[str, int]] = None, mode: Optional[str] = None) -> torch.Tensor:
    """The Triton path, plain product (shapes and launch grid from static sizes only: no host sync).
    ``mode``: ``"tuned"`` / ``"legacy"``, default :func:`config_mode`; one-group products always
    take the legacy kernel (its row split spreads a dense layer's rows over programs)."""
    GROUPED_PATHS["triton"] += 1
    mode = mode or config_mode()
    if mode == "tuned" and q.shape[0] > 1:
        return launch_swap(x, None, ends, None, q, scale, code, fmt, n, k, 1, False, 0, False, config)
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


def launch_swap(x: torch.Tensor, rows: Optional[torch.Tensor], ends: torch.Tensor, rw: Optional[torch.Tensor],
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


def sum_pairs(pairs: torch.Tensor, like: torch.Tensor, top_k: int) -> torch.Tensor:
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


def triton_next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()
