"""The Triton kernel behind :func:`diffgen.kernels.moe.grouped_mm` (imported on first use: needs triton).

One weight-only grouped GEMM for every quantised format: rows of ``x`` are sorted by expert and
expert ``e`` owns rows ``[ends[e-1], ends[e])``; the program for (row split, n-tile, expert)
streams that expert's weight tile ``[BLOCK_N, K]`` once per ``BLOCK_M`` rows, dequantises it in
registers and accumulates in fp32. With ~16 rows per expert (256 tokens x top-8 over 128
experts) every expert is one row tile, so each weight byte is read once: the kernel is bound by
weight reads, not by the tensor cores. An expert with no rows costs one load of two offsets.

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
  (gathers from memory; slower, for odd shapes such as tiny test models).

``EVEN_K`` (constexpr): ``K % BLOCK_K == 0``, so loads along k need no mask and vectorise.

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
def grouped_wo_mm_kernel(x_ptr, q_ptr, s_ptr, code_ptr, pairs_ptr, ends_ptr, out_ptr, N, K, M_SPLIT,
                         FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         F32_DOT: tl.constexpr, EVEN_K: tl.constexpr, LUT: tl.constexpr = 0):
    split = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.program_id(2)
    end = tl.load(ends_ptr + expert)
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    e64 = expert.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    if FMT == 0:
        q_base = q_ptr + e64 * N * K
        s_base = s_ptr + e64 * N
    else:
        q_base = q_ptr + e64 * (N * K // 2)
        s_base = s_ptr + e64 * (N * K // 64)
    if FMT == 1:
        half_k = tl.arange(0, BLOCK_K // 2)
        groups = tl.arange(0, BLOCK_K // 64)
        if LUT == 1:
            table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BLOCK_N, 16))
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
            if FMT == 0:
                w = tl.load(q_base + offs_n[:, None] * K + (k0 + offs_k)[None, :],
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                if F32_DOT:  # int8 and e4m3 values are exact in fp32, bf16 and fp16
                    w = w.to(tl.float32)
                else:
                    w = w.to(a.dtype)
            elif FMT == 1:
                if EVEN_K:
                    half_mask = half_k < BLOCK_K // 2
                    group_mask = groups < BLOCK_K // 64
                else:
                    half_mask = half_k < (K - k0) // 2
                    group_mask = groups < (K - k0) // 64
                packed = tl.load(q_base + offs_n[:, None] * (K // 2) + (k0 // 2 + half_k)[None, :],
                                 mask=n_mask[:, None] & half_mask[None, :], other=0)
                if LUT == 2:  # one 8-byte gather per byte: (high, low) values from the pair table
                    pair = tl.load(pairs_ptr + packed.to(tl.int32))
                    high = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
                    low = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                    values = tl.interleave(high, low)
                else:
                    index = tl.interleave((packed >> 4) & 0xF, packed & 0xF).to(tl.int32)
                    if LUT == 1:
                        values = tl.gather(table, index, 1)
                    else:
                        values = tl.load(code_ptr + index)
                absmax = tl.load(s_base + offs_n[:, None] * (K // 64) + (k0 // 64 + groups)[None, :],
                                 mask=n_mask[:, None] & group_mask[None, :], other=0.0)
                values = tl.reshape(values, (BLOCK_N, BLOCK_K // 64, 64)) * absmax[:, :, None]
                w = tl.reshape(values, (BLOCK_N, BLOCK_K)).to(a.dtype)
                if F32_DOT:
                    w = w.to(tl.float32)
            else:
                flat = offs_n[:, None] * K + (k0 + offs_k)[None, :]
                mask = n_mask[:, None] & k_mask[None, :]
                packed = tl.load(q_base + flat // 2, mask=mask, other=0)
                index = tl.where(flat % 2 == 0, (packed >> 4) & 0xF, packed & 0xF).to(tl.int32)
                absmax = tl.load(s_base + flat // 64, mask=mask, other=0.0)
                w = (tl.load(code_ptr + index) * absmax).to(a.dtype)
                if F32_DOT:
                    w = w.to(tl.float32)
            if F32_DOT:
                acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(w))
            x_ptrs += BLOCK_K
        if FMT == 0:
            acc = acc * tl.load(s_base + offs_n, mask=n_mask, other=0.0)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
