"""The Triton kernels behind :mod:`diffgen.kernels.fused` (imported on first use: needs triton).

Every kernel is row-wise: a program holds ``BLOCK_R`` whole rows (``BLOCK_D`` >= the row length,
masked), so each reduction is one ``tl.reduce`` and each input is read once. Arithmetic in fp32;
``_round`` rounds to the model dtype exactly where transformers' modules round (``KIND``: 0
fp32, no rounding; 1 bf16, round to nearest even on the bits, because the interpreter's own
float32 -> bfloat16 cast truncates; 2 fp16). A value already rounded to bf16 casts exactly, so
the stores give the same bits on a GPU and under ``TRITON_INTERPRET=1``.

``1 / sqrt(v)`` is ``div_rn(1, sqrt_rn(v))`` (correctly rounded, as close to transformers'
``pow(v, -0.5)`` as fp32 allows; ``rsqrt`` is an approximation on the GPU).

Each launcher wraps its one launch in :func:`diffgen.kernels.launches.launch` and allocates its
outputs inside it (``torch.empty`` is no kernel on a GPU). Grids come from static sizes only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from diffgen.kernels import launches

Tensor = torch.Tensor

#: Whether this import's kernels are the interpreter's (``TRITON_INTERPRET=1`` when it was imported).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: Elements one program holds at most (rows x padded row length) before rows stop being batched.
_TILE = 4096


def _kind(dtype: torch.dtype) -> int:
    try:
        return _KINDS[dtype]
    except KeyError:
        raise TypeError(f"fused kernels take float32, bfloat16 or float16 tensors, got {dtype}") from None


def _block(size: int) -> int:
    return triton.next_power_of_2(max(int(size), 1))


def _row_blocks(n_rows: int, size: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_D)`` of a row-wise kernel: whole rows, as many as :data:`_TILE` holds."""
    block_d = _block(size)
    return max(1, min(_TILE // block_d, _block(n_rows))), block_d


def _warps(elements: int) -> int:
    return 2 if elements <= 512 else 4 if elements <= 2048 else 8 if elements <= 8192 else 16


def _rows(x: Tensor) -> Tensor:
    """``x`` as ``(rows, D)`` with a contiguous last dim (a copy only when it must)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 or flat.shape[-1] == 1 else flat.contiguous()


def _fp32(w: Tensor | None, like: Tensor) -> Tensor:
    """A weight as an fp32 contiguous tensor (no op when prepared at load), or a dummy pointer."""
    if w is None:
        return like
    w = w if w.dtype == torch.float32 else w.float()
    return w if w.is_contiguous() else w.contiguous()


# -- helpers -------------------------------------------------------------------------------------

# Reductions through ``tl.reduce`` with triton's own combine functions rather than ``tl.sum`` /
# ``tl.max``: those are ``@jit`` functions of triton.language, which are compiled ones (not the
# interpreter's) when triton was imported before ``TRITON_INTERPRET=1`` was set, and cannot be
# called from an interpreted kernel; ``tl.reduce`` is a builtin that the interpreter patches, and it
# recognises these combine functions (numpy fast paths). Compiled, this is exactly ``tl.sum`` /
# ``tl.max(..., return_indices=True, return_indices_tie_break_left=True)``.
_sum_combine = tl.standard._sum_combine
_max_combine = tl.standard._elementwise_max
_argmax_combine = tl.standard._argmax_combine_tie_break_left


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _max_combine)


@triton.jit
def _argmax(x, BLOCK: tl.constexpr):
    # (max, first index of the max) of a 1-D block.
    return tl.reduce((x, tl.arange(0, BLOCK)), 0, _argmax_combine)


@triton.jit
def _round(x, KIND: tl.constexpr):
    if KIND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    elif KIND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _inv_rms(x, D, eps):
    # (mean(x^2) + eps)^-0.5 over the last axis of a 2-D block (masked lanes hold 0).
    ms = _sum(x * x, 1) / D
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(ms + eps))


@triton.jit
def _row_tile(n_rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # This program's block of rows: (columns, column mask, 2-D mask, int64 row offsets as a column).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    return cols, cmask, (rows < n_rows)[:, None] & cmask[None, :], rows.to(tl.int64)[:, None]


@triton.jit
def _load_rows(ptr, r64, stride, cols, mask):
    return tl.load(ptr + r64 * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _weighted(y, w_ptr, cols, cmask, HAS_W: tl.constexpr):
    # y times the (fp32) weight, where there is one.
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0)[None, :]
    return y


@triton.jit
def _norm(x, w_ptr, cols, cmask, D, eps, HAS_W: tl.constexpr):
    # RMSNorm of each row, times the weight where there is one (fp32, not rounded).
    return _weighted(x * _inv_rms(x, D, eps)[:, None], w_ptr, cols, cmask, HAS_W)


# -- 1. rms_norm ---------------------------------------------------------------------------------


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, D, stride_x, stride_y, eps,
                    HAS_W: tl.constexpr, KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    cols, cmask, mask, r64 = _row_tile(n_rows, D, BLOCK_R, BLOCK_D)
    y = _norm(_load_rows(x_ptr, r64, stride_x, cols, mask), w_ptr, cols, cmask, D, eps, HAS_W)
    tl.store(y_ptr + r64 * stride_y + cols[None, :], _round(y, KIND).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    flat = _rows(x)
    n_rows, size = flat.shape
    block_r, block_d = _row_blocks(n_rows, size)
    w = _fp32(weight, flat)
    with launches.launch("rms_norm"):
        y = torch.empty((n_rows, size), dtype=x.dtype, device=x.device)
        rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
            flat, w, y, n_rows, size, flat.stride(0), y.stride(0), float(eps),
            HAS_W=weight is not None, KIND=_kind(x.dtype), BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=_warps(block_r * block_d))
    return y.view(x.shape)


# -- 2. qkv_norm_rope ----------------------------------------------------------------------------


@triton.jit
def _norm_rope(row, w_ptr, cos, sin, d, dmask, D, eps, sc_d, ss_d, KIND: tl.constexpr, ROPE_KIND: tl.constexpr):
    # rope(round(norm(x) * w)) of one head: x from `row` (contiguous), rotate_half by reading the
    # other half again (from L1) rather than shuffling registers.
    half = D // 2
    rd = tl.where(d < half, d + half, d - half)
    x = tl.load(row + d, mask=dmask, other=0.0).to(tl.float32)
    xr = tl.load(row + rd, mask=dmask, other=0.0).to(tl.float32)
    ms = _sum(x * x, 0) / D
    inv = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms + eps))
    n = _round(x * inv * tl.load(w_ptr + d, mask=dmask, other=0.0), KIND)
    nr = _round(xr * inv * tl.load(w_ptr + rd, mask=dmask, other=0.0), KIND)
    rot = tl.where(d < half, -nr, nr)
    c = tl.load(cos + d * sc_d, mask=dmask, other=0.0).to(tl.float32)
    sn = tl.load(sin + d * ss_d, mask=dmask, other=0.0).to(tl.float32)
    y = _round(_round(n * c, ROPE_KIND) + _round(rot * sn, ROPE_KIND), ROPE_KIND)
    return _round(y, KIND)


@triton.jit
def qkv_norm_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                         S, H, KV, D, eps,
                         sx_b, sx_s,
                         sc_b, sc_s, sc_d, ss_b, ss_s, ss_d,
                         sq_b, sq_h, sq_s, sq_d,
                         sk_b, sk_h, sk_s, sk_d,
                         sv_b, sv_h, sv_s, sv_d,
                         HAS_V: tl.constexpr, KIND: tl.constexpr, ROPE_KIND: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # One program per (token, head slot): slots [0, H) are q heads, [H, H+KV) k heads, [H+KV, H+2KV)
    # v heads (read from the v part, or from the raw k part when there is no v projection). Every
    # branch stores its own result: no value leaves a branch (strides of 1 are specialised to
    # constants, so branch-merged strides could differ in type).
    token = tl.program_id(0)
    slot = tl.program_id(1)
    b = (token // S).to(tl.int64)
    s = (token % S).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    row = qkv_ptr + b * sx_b + s * sx_s
    cos = cos_ptr + b * sc_b + s * sc_s
    sin = sin_ptr + b * ss_b + s * ss_s
    if slot < H:
        y = _norm_rope(row + slot * D, qw_ptr, cos, sin, d, dmask, D, eps, sc_d, ss_d, KIND, ROPE_KIND)
        out = q_ptr + b * sq_b + slot.to(tl.int64) * sq_h + s * sq_s
        tl.store(out + d * sq_d, y.to(q_ptr.dtype.element_ty), mask=dmask)
    elif slot < H + KV:
        y = _norm_rope(row + slot * D, kw_ptr, cos, sin, d, dmask, D, eps, sc_d, ss_d, KIND, ROPE_KIND)
        out = k_ptr + b * sk_b + (slot - H).to(tl.int64) * sk_h + s * sk_s
        tl.store(out + d * sk_d, y.to(k_ptr.dtype.element_ty), mask=dmask)
    else:
        head = slot - H - KV
        if HAS_V:
            x = tl.load(row + slot * D + d, mask=dmask, other=0.0).to(tl.float32)
        else:
            x = tl.load(row + (H + head) * D + d, mask=dmask, other=0.0).to(tl.float32)
        ms = _sum(x * x, 0) / D
        inv = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms + eps))
        out = v_ptr + b * sv_b + head.to(tl.int64) * sv_h + s * sv_s
        tl.store(out + d * sv_d, _round(x * inv, KIND).to(v_ptr.dtype.element_ty), mask=dmask)


def _strides3(t: Tensor, batch: int) -> tuple[int, int, int]:
    # (B or 1, S, D) strides, with a broadcast batch dim read at stride 0.
    return (0 if t.shape[0] == 1 and batch > 1 else t.stride(0)), t.stride(1), t.stride(2)


def qkv_norm_rope(qkv: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, heads: int,
                  kv_heads: int, head_dim: int, eps: float, has_v: bool, q_out: Tensor, k_out: Tensor,
                  v_out: Tensor) -> None:
    batch, seq, _ = qkv.shape
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    qw, kw = _fp32(q_weight, qkv), _fp32(k_weight, qkv)
    block_d = _block(head_dim)
    # torch's promotion of the two dtypes (no torch.promote_types: a dispatched op, counted as one)
    rope_dtype = qkv.dtype if cos.dtype == qkv.dtype else torch.float32
    with launches.launch("qkv_norm_rope"):
        qkv_norm_rope_kernel[(batch * seq, heads + 2 * kv_heads)](
            qkv, qw, kw, cos, sin, q_out, k_out, v_out,
            seq, heads, kv_heads, head_dim, float(eps),
            qkv.stride(0), qkv.stride(1),
            *_strides3(cos, batch), *_strides3(sin, batch),
            *q_out.stride(), *k_out.stride(), *v_out.stride(),
            HAS_V=has_v, KIND=_kind(qkv.dtype), ROPE_KIND=_kind(rope_dtype), BLOCK_D=block_d,
            num_warps=_warps(block_d))


# -- 3. residual_norms ---------------------------------------------------------------------------


@triton.jit
def residual_norms_kernel(h_ptr, x_ptr, pw_ptr, w0_ptr, w1_ptr, w2_ptr, hn_ptr, o0_ptr, o1_ptr, o2_ptr,
                          n_rows, D, stride_h, stride_x, stride_o, eps,
                          HAS_PW: tl.constexpr, N_OUT: tl.constexpr, HAS_W0: tl.constexpr,
                          HAS_W1: tl.constexpr, HAS_W2: tl.constexpr, KIND: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    cols, cmask, mask, r64 = _row_tile(n_rows, D, BLOCK_R, BLOCK_D)
    x = _load_rows(x_ptr, r64, stride_x, cols, mask)
    h = _load_rows(h_ptr, r64, stride_h, cols, mask)
    y = _norm(x, pw_ptr, cols, cmask, D, eps, HAS_PW)
    hn = _round(h + _round(y, KIND), KIND)
    out = r64 * stride_o + cols[None, :]
    tl.store(hn_ptr + out, hn.to(hn_ptr.dtype.element_ty), mask=mask)
    n = hn * _inv_rms(hn, D, eps)[:, None]
    o = _weighted(n, w0_ptr, cols, cmask, HAS_W0)
    tl.store(o0_ptr + out, _round(o, KIND).to(o0_ptr.dtype.element_ty), mask=mask)
    if N_OUT > 1:
        o = _weighted(n, w1_ptr, cols, cmask, HAS_W1)
        tl.store(o1_ptr + out, _round(o, KIND).to(o1_ptr.dtype.element_ty), mask=mask)
    if N_OUT > 2:
        o = _weighted(n, w2_ptr, cols, cmask, HAS_W2)
        tl.store(o2_ptr + out, _round(o, KIND).to(o2_ptr.dtype.element_ty), mask=mask)


def residual_norms(h: Tensor, x: Tensor, post_weight: Tensor | None, weights: list[Tensor | None],
                   eps: float) -> tuple[Tensor, list[Tensor]]:
    hf, xf = _rows(h), _rows(x)
    n_rows, size = hf.shape
    block_r, block_d = _row_blocks(n_rows, size)
    pw = _fp32(post_weight, hf)
    ws = [_fp32(w, hf) for w in weights] + [hf] * (3 - len(weights))
    flags = [w is not None for w in weights] + [False] * (3 - len(weights))
    with launches.launch("residual_norms"):
        h_new = torch.empty((n_rows, size), dtype=h.dtype, device=h.device)
        outs = [torch.empty_like(h_new) for _ in weights]
        slots = outs + [h_new] * (3 - len(outs))
        residual_norms_kernel[(triton.cdiv(n_rows, block_r),)](
            hf, xf, pw, *ws, h_new, *slots, n_rows, size, hf.stride(0), xf.stride(0), h_new.stride(0),
            float(eps), HAS_PW=post_weight is not None, N_OUT=len(weights), HAS_W0=flags[0], HAS_W1=flags[1],
            HAS_W2=flags[2], KIND=_kind(h.dtype), BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=_warps(block_r * block_d))
    return h_new.view(h.shape), [o.view(h.shape) for o in outs]


# -- 4. gelu_mul ---------------------------------------------------------------------------------


@triton.jit
def gelu_mul_kernel(x_ptr, y_ptr, I, stride_x, stride_y, KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    # gelu_tanh(g) = 0.5 g (1 + tanh(z)) = g / (1 + exp(-2 z)), z = sqrt(2/pi) (g + 0.044715 g^3):
    # no cancellation for negative g, and exp's overflow gives the right limit (-0). (torch's
    # 1 + tanh(z) cancels in the far negative tail, |gelu| < ~1e-4: there the two differ by a few
    # percent of a value below 1e-4, i.e. < 1e-5 absolute; elsewhere they agree to the last bf16 bit.)
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    act = _round(g / (1.0 + tl.exp(-2.0 * z)), KIND)
    tl.store(y_ptr + row * stride_y + cols, _round(act * u, KIND).to(y_ptr.dtype.element_ty), mask=mask)


def gelu_mul(gate_up: Tensor) -> Tensor:
    flat = _rows(gate_up)
    n_rows, width = flat.shape
    inner = width // 2
    block = min(1024, _block(inner))
    with launches.launch("gelu_mul"):
        y = torch.empty((n_rows, inner), dtype=gate_up.dtype, device=gate_up.device)
        gelu_mul_kernel[(n_rows, triton.cdiv(inner, block))](
            flat, y, inner, flat.stride(0), y.stride(0), KIND=_kind(gate_up.dtype), BLOCK=block,
            num_warps=_warps(block))
    return y.view(*gate_up.shape[:-1], inner)


# -- 5. router_topk ------------------------------------------------------------------------------


@triton.jit
def router_topk_kernel(s_ptr, pes_ptr, w_ptr, i_ptr, E, stride_s, K: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    s = tl.load(s_ptr + row * stride_s + e, mask=emask, other=float("-inf")).to(tl.float32)
    ex = tl.where(emask, tl.exp(s - _max(s, 0)), 0.0)
    p = ex / _sum(ex, 0)
    cur = tl.where(emask, p, -1.0)
    kk = tl.arange(0, BLOCK_K)
    top_w = tl.full([BLOCK_K], 0.0, tl.float32)  # tl.full: tl.zeros is a triton.language @jit
    top_i = tl.full([BLOCK_K], 0, tl.int32)
    for j in tl.static_range(K):
        v, i = _argmax(cur, BLOCK_E)
        top_w = tl.where(kk == j, v, top_w)
        top_i = tl.where(kk == j, i, top_i)
        cur = tl.where(e == i, -2.0, cur)
    kmask = kk < K
    top_w = top_w / _sum(tl.where(kmask, top_w, 0.0), 0)
    scale = tl.load(pes_ptr + top_i, mask=kmask, other=0.0).to(tl.float32)
    tl.store(w_ptr + row * K + kk, top_w * scale, mask=kmask)
    tl.store(i_ptr + row * K + kk, top_i.to(tl.int64), mask=kmask)


def router_topk(scores: Tensor, per_expert_scale: Tensor, k: int) -> tuple[Tensor, Tensor]:
    flat = _rows(scores)
    tokens, experts = flat.shape
    pes = per_expert_scale if per_expert_scale.is_contiguous() else per_expert_scale.contiguous()
    block_e = _block(experts)
    with launches.launch("router_topk"):
        weights = torch.empty((tokens, k), dtype=torch.float32, device=scores.device)
        index = torch.empty((tokens, k), dtype=torch.int64, device=scores.device)
        router_topk_kernel[(tokens,)](flat, pes, weights, index, experts, flat.stride(0), K=k, BLOCK_E=block_e,
                                      BLOCK_K=_block(k), num_warps=_warps(block_e))
    return weights, index


# -- 6. ffn_combine ------------------------------------------------------------------------------


@triton.jit
def ffn_combine_kernel(h_ptr, m_ptr, e_ptr, w1_ptr, w2_ptr, wp_ptr, ls_ptr, o_ptr, n_rows, D,
                       stride_h, stride_m, stride_e, stride_o, eps,
                       HAS_W1: tl.constexpr, HAS_W2: tl.constexpr, HAS_WP: tl.constexpr, KIND: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    cols, cmask, mask, r64 = _row_tile(n_rows, D, BLOCK_R, BLOCK_D)
    a = _norm(_load_rows(m_ptr, r64, stride_m, cols, mask), w1_ptr, cols, cmask, D, eps, HAS_W1)
    c = _norm(_load_rows(e_ptr, r64, stride_e, cols, mask), w2_ptr, cols, cmask, D, eps, HAS_W2)
    mixed = _round(_round(a, KIND) + _round(c, KIND), KIND)
    y = _norm(mixed, wp_ptr, cols, cmask, D, eps, HAS_WP)
    h = _load_rows(h_ptr, r64, stride_h, cols, mask)
    out = _round(_round(h + _round(y, KIND), KIND) * tl.load(ls_ptr).to(tl.float32), KIND)
    tl.store(o_ptr + r64 * stride_o + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)


def ffn_combine(h: Tensor, m: Tensor, e: Tensor, w1: Tensor | None, w2: Tensor | None, w_post: Tensor | None,
                layer_scalar: Tensor, eps: float) -> Tensor:
    hf, mf, ef = _rows(h), _rows(m), _rows(e)
    n_rows, size = hf.shape
    block_r, block_d = _row_blocks(n_rows, size)
    with launches.launch("ffn_combine"):
        out = torch.empty((n_rows, size), dtype=h.dtype, device=h.device)
        ffn_combine_kernel[(triton.cdiv(n_rows, block_r),)](
            hf, mf, ef, _fp32(w1, hf), _fp32(w2, hf), _fp32(w_post, hf), layer_scalar, out, n_rows, size,
            hf.stride(0), mf.stride(0), ef.stride(0), out.stride(0), float(eps),
            HAS_W1=w1 is not None, HAS_W2=w2 is not None, HAS_WP=w_post is not None, KIND=_kind(h.dtype),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_warps(block_r * block_d))
    return out.view(h.shape)
