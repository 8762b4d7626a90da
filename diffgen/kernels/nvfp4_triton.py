"""The Triton kernel behind :func:`diffgen.kernels.nvfp4.grouped_mm_nvfp4` (imported on first use).

A weight-only grouped GEMM over NVFP4 expert stacks (layout in :mod:`diffgen.kernels.nvfp4`):
rows of ``x`` are sorted by expert, expert ``e`` owns rows ``[ends[e-1], ends[e])``; the program
for (row split, n-tile, expert) streams its expert's ``[BLOCK_N, K]`` weight tile once per
``BLOCK_M`` rows. With ~16 rows per expert that is one row tile, so each weight byte is read once.

Decoding in registers, with bit operations only (no lookup-table gathers):

* an e2m1 nibble ``c`` (sign in bit 3, exponent in bits 1-2, mantissa in bit 0) becomes the
  fp16 whose bits are ``(c & 8) << 12 | (c & 7) << 9`` — the sign in fp16's sign bit, the two
  exponent bits in the low bits of fp16's exponent, the mantissa bit in its top mantissa bit.
  That fp16 is ``e2m1(c) * 2**-14`` for every code, zero and the subnormal 0.5 included (fp16
  subnormals are exact, and nothing here flushes them);
* an e4m3 scale byte ``b`` becomes the fp16 with bits ``(b & 0x80) << 8 | (b & 0x7F) << 7``,
  which is ``e4m3(b) * 2**-8`` (e4m3's subnormals land on fp16 subnormals, again exact). Reading
  the scales as bytes keeps float8 types out of the kernel, so it compiles for sm80 too.

Their product times ``2**22`` is the weight before the row scale, exact in fp32 and in bf16
(2 + 4 significant bits); the dot products accumulate in fp32 and each output row's sum is
multiplied by its fp32 ``scale2`` at the end.

``F32_DOT``: the product in fp32 (``input_precision="ieee"``) on operands rounded to the
activation dtype first — for fp32 activations and under ``TRITON_INTERPRET=1`` (whose ``tl.dot``
on bf16 operands is wrong in triton 3.9, as :mod:`diffgen.kernels.moe_triton` notes).
``EVEN_K``: ``K % BLOCK_K == 0``, loads along k unmasked.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_nvfp4_kernel(x_ptr, q_ptr, s_ptr, s2_ptr, ends_ptr, out_ptr, N, K, M_SPLIT,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         F32_DOT: tl.constexpr, EVEN_K: tl.constexpr):
    split = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.program_id(2)
    end = tl.load(ends_ptr + expert)
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    e64 = expert.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    half_k = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, BLOCK_K // 16)
    q_base = q_ptr + e64 * (N * (K // 2))
    s_base = s_ptr + e64 * (N * (K // 16))
    s2_base = s2_ptr + e64 * N
    for m0 in range(start + split * BLOCK_M, end, M_SPLIT * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                k_mask = offs_k < BLOCK_K
                half_mask = half_k < BLOCK_K // 2
                group_mask = groups < BLOCK_K // 16
            else:
                k_mask = offs_k < K - k0
                half_mask = half_k < (K - k0) // 2
                group_mask = groups < (K - k0) // 16
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            packed = tl.load(q_base + offs_n[:, None] * (K // 2) + (k0 // 2 + half_k)[None, :],
                             mask=n_mask[:, None] & half_mask[None, :], other=0).to(tl.int32)
            codes = tl.interleave(packed & 0xF, packed >> 4)  # element 2j: low nibble of byte j
            bits = ((codes & 8) << 12) | ((codes & 7) << 9)
            values = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            raw = tl.load(s_base + offs_n[:, None] * (K // 16) + (k0 // 16 + groups)[None, :],
                          mask=n_mask[:, None] & group_mask[None, :], other=0).to(tl.int32)
            sbits = ((raw & 0x80) << 8) | ((raw & 0x7F) << 7)
            scales = sbits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 4194304.0  # 2**22
            values = tl.reshape(values, (BLOCK_N, BLOCK_K // 16, 16)) * scales[:, :, None]
            w = tl.reshape(values, (BLOCK_N, BLOCK_K)).to(a.dtype)
            if F32_DOT:
                acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(w))
            x_ptrs += BLOCK_K
        acc = acc * tl.load(s2_base + offs_n, mask=n_mask, other=0.0)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
