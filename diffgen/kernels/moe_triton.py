"""The Triton kernels behind :func:`diffgen.kernels.moe.grouped_mm` (imported on first use: needs triton).

Two kernels share one weight-tile loader (:func:`_weight_tile`, every format):

* :func:`grouped_mm_swap_kernel` (the default, ``DIFFGEN_MOE_CONFIG=tuned``): tuned for ~16 rows
  per expert. It computes ``out^T = W x^T`` per (expert, n-tile) work item, so the expert's output
  rows fill the MMA's M side (64-128) and the few token rows are its N side (16-64), and a
  persistent grid of programs loops over the work items (expert-major, so the programs working on
  one expert share its rows of ``x`` in L2). Its prologue can gather the rows of ``x`` itself
  (``GATHER``: row ``perm[r] // TOP_K``, no separate index kernel); its epilogues can apply the
  gated activation to a gate/up pair of tiles (``ACT``: the gate_up projection writes
  ``act(gate) * up``) or multiply each row by its routing weight and write it to its (token, k)
  slot (``SCATTER``: the down projection unpermutes; :func:`sum_pairs_kernel` then sums each
  token's k slots in order and casts, deterministically — no atomics).
* :func:`grouped_wo_mm_kernel` (``DIFFGEN_MOE_CONFIG=legacy``, and one-group products), the
  first kernel, kept for A/B. One weight-only grouped GEMM: rows of ``x`` are sorted by expert and
expert ``e`` owns rows ``[ends[e-1], ends[e])``; the program for (row split, n-tile, expert)
streams that expert's weight tile ``[BLOCK_N, K]`` once per ``BLOCK_M`` rows, dequantises it in
registers and accumulates in fp32. With ~16 rows per expert (256 tokens x top-8 over 128
experts) every expert is one row tile, so each weight byte is read once: the kernel is bound by
weight reads, not by the tensor cores. An expert with no rows costs one load of two offsets.
Its row tile (16-64 rows) sits on the MMA's M side, made for large M: the swap kernel above
puts the weights there instead.

``FMT`` (constexpr):

* 0 — int8 or float8-e4m3 weights ``(E, N, K)`` with one fp32 scale per output row ``(E, N, 1)``:
  the raw values enter the dot product exactly (int8 and e4m3 are exact in bf16/fp16/fp32) and
  the row scale multiplies the fp32 accumulator at the end;
* 1 — NF4 with ``K % 64 == 0`` (blocks never straddle a row): ``(E, N*K/2)`` bytes, high nibble
  first, looked up in the code table and scaled per 64-wide block ``(E, N*K/64)`` before the
  dot product. ``LUT`` picks the lookup: 2 (default) gathers both values of a byte at once
  from ``pairs`` (256 x two fp32 as int64, L1-resident); 0 unpacks the nibbles with an
  interleave and gathers each from the 16-entry ``code``; 1 uses ``tl.gather`` on a register
  copy of ``code`` (warp shuffles). Compiled for sm_90 with 64x64 tiles and 4 warps: 2 needs
  656 instructions and 103 registers, 0 needs 1048 and 138, 1 needs all 255;
* 2 — NF4 of any shape (blocks may straddle rows): the same arithmetic from flat indices
  (gathers from memory; slower, for odd shapes such as tiny test models);
* 3 — unquantised weights ``(E, N, K)`` (bf16 / fp16 / fp32, the activations' dtype): loaded as
  they are, no scale (the "bf16" format: torch's ``_grouped_mm`` without its host-sync fallback).

``EVEN_K`` (constexpr): ``K % BLOCK_K == 0``, so loads along k need no mask and vectorise.

``RNE`` (constexpr): round to bf16 by hand (nearest even) where results are rounded: the
interpreter's bf16 casts and stores truncate (triton 3.9), the GPU's round to nearest even.

``F32_DOT`` (constexpr): the product in fp32 (``input_precision="ieee"``), on operands first
rounded to the activation dtype — set for fp32 activations, and under ``TRITON_INTERPRET=1``,
whose ``tl.dot`` and int8-to-bf16 casts give wrong numbers for bf16 operands (triton 3.9; bf16
products are exact in fp32, so this is the same arithmetic as the bf16 tensor-core product).

Offsets inside one expert's matrix and inside ``x`` are int32 (an expert matrix and the sorted
rows each stay far below 2**31 elements); only the expert's base is offset in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _weight_tile(q_base, s_base, code_ptr, pairs_ptr, rows, row_mask, k0, offs_k, k_mask, K,
                 FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 LUT: tl.constexpr):
    """Weights ``[BLOCK_N, BLOCK_K]`` of matrix rows ``rows`` at columns ``k0 + offs_k``: the stored
    values for FMT 0 (int8 / e4m3, scaled later) and 3 (float), dequantised fp32 for NF4."""
    if FMT == 0 or FMT == 3:
        w = tl.load(q_base + rows[:, None] * K + (k0 + offs_k)[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
    elif FMT == 1:
        half_k = tl.arange(0, BLOCK_K // 2)
        groups = tl.arange(0, BLOCK_K // 64)
        if EVEN_K:
            half_mask = half_k < BLOCK_K // 2
            group_mask = groups < BLOCK_K // 64
        else:
            half_mask = half_k < (K - k0) // 2
            group_mask = groups < (K - k0) // 64
        packed = tl.load(q_base + rows[:, None] * (K // 2) + (k0 // 2 + half_k)[None, :],
                         mask=row_mask[:, None] & half_mask[None, :], other=0)
        if LUT == 2:  # one 8-byte gather per byte: (high, low) values from the pair table
            pair = tl.load(pairs_ptr + packed.to(tl.int32))
            high = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
            low = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            values = tl.interleave(high, low)
        else:
            index = tl.interleave((packed >> 4) & 0xF, packed & 0xF).to(tl.int32)
            if LUT == 1:
                table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
                values = tl.gather(table, index, 1)
            else:
                values = tl.load(code_ptr + index)
        absmax = tl.load(s_base + rows[:, None] * (K // 64) + (k0 // 64 + groups)[None, :],
                         mask=row_mask[:, None] & group_mask[None, :], other=0.0)
        values = tl.reshape(values, (BLOCK_N, BLOCK_K // 64, 64)) * absmax[:, :, None]
        w = tl.reshape(values, (BLOCK_N, BLOCK_K))
    else:
        flat = rows[:, None] * K + (k0 + offs_k)[None, :]
        mask = row_mask[:, None] & k_mask[None, :]
        packed = tl.load(q_base + flat // 2, mask=mask, other=0)
        index = tl.where(flat % 2 == 0, (packed >> 4) & 0xF, packed & 0xF).to(tl.int32)
        absmax = tl.load(s_base + flat // 64, mask=mask, other=0.0)
        w = tl.load(code_ptr + index) * absmax
    return w


@triton.jit
def _rounded(x, DT: tl.constexpr, RNE: tl.constexpr):
    """fp32 ``x`` rounded to the activation dtype ``DT``, as fp32. ``RNE``: round to nearest even
    by hand (bf16 under ``TRITON_INTERPRET=1``, whose bf16 casts and stores truncate; the GPU's
    ``cvt.rn`` rounds to nearest even, as torch does)."""
    if RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(DT).to(tl.float32)


@triton.jit
def _operand(w, DT: tl.constexpr, FMT: tl.constexpr, F32_DOT: tl.constexpr, RNE: tl.constexpr):
    """A weight tile as the product's operand: rounded to the activation dtype (int8 / e4m3 / the
    stored float values are exact there), then fp32 where the product runs in fp32."""
    if F32_DOT:
        if FMT == 0 or FMT == 3:  # exact in fp32 (the interpreter's int8/e4m3 -> bf16 casts are wrong)
            return w.to(tl.float32)
        return _rounded(w.to(tl.float32), DT, RNE)
    return w.to(DT)


@triton.jit
def _matrix_bases(q_ptr, s_ptr, e64, N_ROWS, K, FMT: tl.constexpr):
    if FMT == 0 or FMT == 3:
        return q_ptr + e64 * N_ROWS * K, s_ptr + e64 * N_ROWS
    return q_ptr + e64 * (N_ROWS * K // 2), s_ptr + e64 * (N_ROWS * K // 64)


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """``act(x)`` in fp32: 1 GELU (tanh approximation), 2 GELU (erf), 3 SiLU."""
    if ACT == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        inner = tl.minimum(tl.maximum(inner, -30.0), 30.0)  # tanh is +-1 there; exp stays finite
        return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))  # 1 + tanh(inner)
    elif ACT == 2:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        return x / (1.0 + tl.exp(-x))


@triton.jit
def grouped_mm_swap_kernel(x_ptr, rows_ptr, q_ptr, s_ptr, code_ptr, pairs_ptr, ends_ptr, rw_ptr, out_ptr,
                           N, K, N_ROWS, TILES_N, WORK, NUM_PROGRAMS,
                           FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           F32_DOT: tl.constexpr, EVEN_K: tl.constexpr, LUT: tl.constexpr,
                           GATHER: tl.constexpr, TOP_K: tl.constexpr, ACT: tl.constexpr, SCATTER: tl.constexpr,
                           RNE: tl.constexpr = False):
    """Persistent swap-AB grouped product. Work item ``w`` is expert ``w // TILES_N``, output
    columns ``[t * BLOCK_N, (t+1) * BLOCK_N)`` with ``t = w % TILES_N``; program ``p`` takes items
    ``p, p + NUM_PROGRAMS, ...``. Per item and block of ``BLOCK_M`` sorted rows it accumulates
    ``acc[BLOCK_N, BLOCK_M] = W[rows] x^T`` in fp32.

    ``N``: output columns (with ``ACT``, the intermediate width: the matrix has ``N_ROWS = 2N``
    rows, gate first). ``GATHER``: sorted row ``r`` reads ``x[rows_ptr[r] // TOP_K]`` (else
    ``x[r]``). ``SCATTER``: row ``r`` is multiplied by ``rw_ptr[rows_ptr[r]]`` (fp32, after
    rounding to the activation dtype, as the unfused path rounds the product) and written as fp32
    to row ``rows_ptr[r]`` of ``out`` (pair order); else written to row ``r`` in ``out``'s dtype.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_bn = tl.arange(0, BLOCK_N)
    for work in range(pid, WORK, NUM_PROGRAMS):
        expert = work // TILES_N
        offs_n = (work % TILES_N) * BLOCK_N + offs_bn
        n_mask = offs_n < N
        end = tl.load(ends_ptr + expert)
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
        q_base, s_base = _matrix_bases(q_ptr, s_ptr, expert.to(tl.int64), N_ROWS, K, FMT)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < end
            if GATHER or SCATTER:
                pair = tl.load(rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int32)
            if GATHER:
                src = pair // TOP_K
            else:
                src = offs_m
            xt_ptrs = x_ptr + src[None, :] * K + offs_k[:, None]  # x^T tile [BLOCK_K, BLOCK_M]
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            if ACT != 0:
                acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    k_mask = offs_k < BLOCK_K
                else:
                    k_mask = offs_k < K - k0
                xt = tl.load(xt_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
                w = _operand(_weight_tile(q_base, s_base, code_ptr, pairs_ptr, offs_n, n_mask, k0, offs_k, k_mask, K,
                                          FMT, BLOCK_N, BLOCK_K, EVEN_K, LUT), DT, FMT, F32_DOT, RNE)
                if F32_DOT:
                    acc += tl.dot(w, xt.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(w, xt)
                if ACT != 0:
                    w_up = _operand(_weight_tile(q_base, s_base, code_ptr, pairs_ptr, N + offs_n, n_mask, k0, offs_k,
                                                 k_mask, K, FMT, BLOCK_N, BLOCK_K, EVEN_K, LUT), DT, FMT, F32_DOT, RNE)
                    if F32_DOT:
                        acc_up += tl.dot(w_up, xt.to(tl.float32), input_precision="ieee")
                    else:
                        acc_up += tl.dot(w_up, xt)
                xt_ptrs += BLOCK_K
            if FMT == 0:
                acc = acc * tl.load(s_base + offs_n, mask=n_mask, other=0.0)[:, None]
                if ACT != 0:
                    acc_up = acc_up * tl.load(s_base + N + offs_n, mask=n_mask, other=0.0)[:, None]
            if ACT != 0:  # as torch: gate and up rounded, act(gate) rounded, the product rounded
                gate = _rounded(acc, DT, RNE)
                acc = _rounded(_activation(gate, ACT), DT, RNE) * _rounded(acc_up, DT, RNE)
            acc = _rounded(acc, DT, RNE)
            mask = n_mask[:, None] & m_mask[None, :]
            if SCATTER:
                weight = tl.load(rw_ptr + pair, mask=m_mask, other=0.0)
                tl.store(out_ptr + pair[None, :].to(tl.int64) * N + offs_n[:, None], acc * weight[None, :], mask=mask)
            else:
                tl.store(out_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None],
                         acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_wo_mm_kernel(x_ptr, q_ptr, s_ptr, code_ptr, pairs_ptr, ends_ptr, out_ptr, N, K, M_SPLIT,
                         FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         F32_DOT: tl.constexpr, EVEN_K: tl.constexpr, LUT: tl.constexpr = 0,
                         RNE: tl.constexpr = False):
    """The first kernel (legacy config): one program per (row split, n-tile, expert), ``x W^T`` with
    the token rows on the MMA's M side."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    split = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.program_id(2)
    end = tl.load(ends_ptr + expert)
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    q_base, s_base = _matrix_bases(q_ptr, s_ptr, expert.to(tl.int64), N, K, FMT)
    for m0 in range(start + split * BLOCK_M, end, M_SPLIT * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:  # no mask along k: lets loads vectorise
                k_mask = offs_k < BLOCK_K
            else:
                k_mask = offs_k < K - k0
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = _operand(_weight_tile(q_base, s_base, code_ptr, pairs_ptr, offs_n, n_mask, k0, offs_k, k_mask, K,
                                      FMT, BLOCK_N, BLOCK_K, EVEN_K, LUT), DT, FMT, F32_DOT, RNE)
            if F32_DOT:
                acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(w))
            x_ptrs += BLOCK_K
        if FMT == 0:
            acc = acc * tl.load(s_base + offs_n, mask=n_mask, other=0.0)[None, :]
        if RNE:
            acc = _rounded(acc, DT, RNE)
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def sum_pairs_kernel(pairs_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, RNE: tl.constexpr = False):
    """``out[t] = sum_j pairs[t * TOP_K + j]`` (fp32, j in order: deterministic), rounded to
    ``out``'s dtype: the last step of the fused combine, one launch for the sum and the cast."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(pairs_ptr + (token * TOP_K + j) * H + offs, mask=mask, other=0.0)
    if RNE:
        acc = _rounded(acc, out_ptr.dtype.element_ty, RNE)
    tl.store(out_ptr + token * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
