"""The Triton kernels behind :mod:`diffgen.kernels.sampler` (imported on first use: needs triton).

``sample_tail_kernel``: one program per (row, position) streams the vocabulary in blocks
(soft-cap, temperature, online log-sum-exp and entropy, running argmax, the Gumbel-max draw, the
self-conditioning store). ``noise_tokens_kernel``: one program per (row, block of positions)
derives the row's key and draws its uniform tokens. The draws' layout is
:mod:`diffgen.kernels.noise`'s, written here by value (checked below).

Triton resolves the names a kernel uses in this module's globals (and its interpreter patches the
``tl`` it finds here), and decides at decoration time whether a kernel is interpreted: the front
module imports this one afresh when ``TRITON_INTERPRET`` changed (:data:`INTERPRETED`).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from diffgen.kernels.noise import (
    KEY_DOMAIN,
    PURPOSE_GUMBEL,
    PURPOSE_TOKENS,
    STREAM_GUMBEL,
    UNIFORM_SCALE,
    UNIFORM_SHIFT,
)

#: Whether this import's kernels are the interpreter's (``TRITON_INTERPRET=1`` when it was imported).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# The kernels refer to these by value (literals below): the layout of the draws is noise.py's.
assert (PURPOSE_GUMBEL, PURPOSE_TOKENS, STREAM_GUMBEL, KEY_DOMAIN, UNIFORM_SHIFT, UNIFORM_SCALE) == (
    0, 1, 3, 0x6B657973, 9, 2.0 ** -23)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    # Philox4x32-10 on uint32 words: triton.language.random.philox_impl's rounds, written out
    # here because that one is a triton.language @jit (compiled, not interpreted, when triton
    # was imported before TRITON_INTERPRET=1 was set).
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(0xD2511F53, _c0) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _derive_key(seed, canvas, step, STREAM: tl.constexpr):
    # noise.step_keys for one row, from int64 scalars: the first two words of
    # philox(counter=(step, canvas, stream, DOMAIN), key=seed's words), joined as (low, high).
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = step.to(tl.uint32)
    c1 = canvas.to(tl.uint32)
    c2 = c0 * 0 + STREAM
    c3 = c0 * 0 + 0x6B657973
    w0, w1, _, _ = _philox(c0, c1, c2, c3, k0, k1)
    return w0, w1


@triton.jit
def _tanh(y):
    # tanh from exp, since triton.language has none (libdevice's is backend-specific and absent
    # from the interpreter): an odd Taylor polynomial below |y| = 0.2 (relative error < 1e-9
    # there, where (1 - e) / (1 + e) would cancel), the exp form above it.
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    y2 = a * a
    small = a * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (
        -0.05396825396825397 + y2 * 0.021869488536155203))))
    r = tl.where(a < 0.2, small, large)
    return tl.where(y < 0.0, -r, r)


@triton.jit
def _gumbel(words, FAST: tl.constexpr):
    # Standard Gumbel noise -log(E), E = -log(u), from 32-bit words: u = ((w >> 9) + 0.5) * 2**-23.
    k = words >> 9
    u = (k.to(tl.float32) + 0.5) * 1.1920928955078125e-07
    if FAST:
        # CUDA: the SFU's lg2.approx.f32 (one instruction; tl.log expands to a ~25-instruction
        # libdevice polynomial). Its error is absolute near 1, so E = -log(u) for u near 1 (the
        # large Gumbel values that win the argmax) comes from the series -log(1 - v) =
        # v + v^2/2 + ... + v^8/8 with v = 1 - u exact (relative error < 1e-9 for v < 1/8).
        v = ((8388607 - k).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        series = v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * (0.25 + v * (
            0.2 + v * (0.16666666666666666 + v * (0.14285714285714285 + v * 0.125)))))))
        lg2_u = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                          is_pure=True, pack=1)
        exponential = tl.where(v < 0.125, series, lg2_u * -0.6931471805599453)
        lg2_e = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [exponential],
                                          dtype=tl.float32, is_pure=True, pack=1)
        return lg2_e * -0.6931471805599453
    else:
        return -tl.log(-tl.log(u))


@triton.jit
def _block(logits, sc, start, V, key, c1, inv_t, cap, inv_cap, m, s, t, best_x, best_i, best_y, best_j,
           MASKED: tl.constexpr, HAS_CAP: tl.constexpr, WRITE_SC: tl.constexpr, FAST_LOG: tl.constexpr,
           BLOCK_V: tl.constexpr):
    # One block of BLOCK_V logits from `start`: returns the updated running state. MASKED only
    # for the last, partial block (full blocks skip the bounds checks).
    neg_inf = float("-inf")
    idx = start + tl.arange(0, BLOCK_V)
    if MASKED:
        mask = idx < V
        x = tl.load(logits + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(logits + idx).to(tl.float32)
    if HAS_CAP:
        x = _tanh(x * inv_cap) * cap
    x = x * inv_t
    if MASKED:
        x = tl.where(mask, x, neg_inf)
    if WRITE_SC:
        if sc.dtype.element_ty == tl.bfloat16:
            # Round to nearest even by hand: the same bits as the GPU's cvt.rn (the
            # interpreter's own float32 -> bfloat16 cast truncates).
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = x.to(sc.dtype.element_ty)
        if MASKED:
            tl.store(sc + idx, out, mask=mask)
        else:
            tl.store(sc + idx, out)

    bx, bi = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    better = bx > best_x
    best_i = tl.where(better, start + bi, best_i)
    best_x = tl.where(better, bx, best_x)

    # Online log-sum-exp and entropy, relative to the running max (no large-magnitude
    # cancellation: every term of t is <= 0). The guards keep -inf logits and the empty
    # start (m = -inf, s = 0) free of NaN.
    m_new = tl.maximum(m, bx)
    m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    shift = tl.where(s > 0.0, (m - m_ref) * s, 0.0)
    e = tl.exp(x - m_ref)
    d = e * tl.where(e > 0.0, x - m_ref, 0.0)
    t = (t + shift) * alpha + tl.sum(d, axis=0)
    s = s * alpha + tl.sum(e, axis=0)

    # Gumbel-max: word v & 3 of philox(counter=(v >> 2, pos, PURPOSE_GUMBEL, 0), key).
    quad = (start // 4 + tl.arange(0, BLOCK_V // 4)).to(tl.uint32)
    zero = quad * 0
    r0, r1, r2, r3 = tl.philox(key, quad, zero + c1, zero, zero)
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_V])
    y = x + _gumbel(words, FAST_LOG)
    by, bj = tl.max(y, axis=0, return_indices=True, return_indices_tie_break_left=True)
    better = by > best_y
    best_j = tl.where(better, start + bj, best_j)
    best_y = tl.where(better, by, best_y)
    return m_new, s, t, best_x, best_i, best_y, best_j


@triton.jit
def sample_tail_kernel(
    logits_ptr, temp_ptr, keys_ptr, sc_ptr, sampled_ptr, argmax_ptr, entropy_ptr,
    C, V, stride_lb, stride_lc, stride_t, stride_sb, stride_sc, cap, inv_cap, canvas_ptr, stride_cv, step_ptr,
    HAS_CAP: tl.constexpr, WRITE_SC: tl.constexpr, FAST_LOG: tl.constexpr, BLOCK_V: tl.constexpr,
    DERIVE: tl.constexpr,
):
    # One program per (row, position), streaming the vocabulary in blocks of BLOCK_V.
    pid = tl.program_id(0)
    row = pid // C
    pos = pid % C
    if DERIVE:
        # keys_ptr holds the row seeds: the key is step_keys(seed, canvas, step, STREAM_GUMBEL).
        w0, w1 = _derive_key(tl.load(keys_ptr + row), tl.load(canvas_ptr + row * stride_cv),
                             tl.load(step_ptr), 3)
        key = (w1.to(tl.uint64) << 32) | w0.to(tl.uint64)
    else:
        key = tl.load(keys_ptr + row)
    inv_t = tl.math.div_rn(1.0, tl.load(temp_ptr + row * stride_t))
    logits = logits_ptr + row.to(tl.int64) * stride_lb + pos.to(tl.int64) * stride_lc
    sc = sc_ptr + row.to(tl.int64) * stride_sb + pos.to(tl.int64) * stride_sc
    c1 = pos.to(tl.uint32)

    neg_inf = float("-inf")
    m = tl.full([], neg_inf, tl.float32)      # running max of scaled
    s = tl.full([], 0.0, tl.float32)          # sum exp(x - m)
    t = tl.full([], 0.0, tl.float32)          # sum exp(x - m) * (x - m)
    best_x = tl.full([], neg_inf, tl.float32)
    best_i = tl.full([], 0, tl.int32)
    best_y = tl.full([], neg_inf, tl.float32)
    best_j = tl.full([], 0, tl.int32)
    full = V - V % BLOCK_V
    for start in range(0, full, BLOCK_V):
        m, s, t, best_x, best_i, best_y, best_j = _block(
            logits, sc, start, V, key, c1, inv_t, cap, inv_cap, m, s, t, best_x, best_i, best_y, best_j,
            False, HAS_CAP, WRITE_SC, FAST_LOG, BLOCK_V)
    if full < V:
        m, s, t, best_x, best_i, best_y, best_j = _block(
            logits, sc, full, V, key, c1, inv_t, cap, inv_cap, m, s, t, best_x, best_i, best_y, best_j,
            True, HAS_CAP, WRITE_SC, FAST_LOG, BLOCK_V)

    tl.store(argmax_ptr + pid, best_i.to(tl.int64))
    tl.store(sampled_ptr + pid, best_j.to(tl.int64))
    tl.store(entropy_ptr + pid, tl.log(s) - t / s)


@triton.jit
def noise_tokens_kernel(seeds_ptr, canvas_ptr, step_ptr, keep_ptr, accepted_ptr, out_ptr, L, V, stride_cv,
                        STREAM: tl.constexpr, KEEP: tl.constexpr, BLOCK: tl.constexpr):
    # Program (row, block of positions): noise.uniform_tokens(step_keys(seed, canvas, step, STREAM))
    # for positions n of the block (word n & 3 of philox(counter=(n >> 2, 0, PURPOSE_TOKENS, 0),
    # key), times V >> 32), or keep[n] where accepted[n].
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = n < L
    k0, k1 = _derive_key(tl.load(seeds_ptr + row), tl.load(canvas_ptr + row * stride_cv), tl.load(step_ptr),
                         STREAM)
    q = (n >> 2).to(tl.uint32)
    zero = q * 0
    r0, r1, r2, r3 = _philox(q, zero, zero + 1, zero, k0, k1)
    lane = n & 3
    word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    token = tl.umulhi(word, (zero + V).to(tl.uint32)).to(tl.int64)
    offs = row.to(tl.int64) * L + n
    if KEEP:
        accepted = tl.load(accepted_ptr + offs, mask=mask, other=0) != 0
        token = tl.where(accepted, tl.load(keep_ptr + offs, mask=mask, other=0), token)
    tl.store(out_ptr + offs, token, mask=mask)
