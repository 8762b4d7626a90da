"""Fused row-wise ops for diffgen's own decoder/encoder layer forward: Triton kernels, torch fallbacks.

A DiffusionGemma layer spends most of its kernel launches on glue: 11 RMSNorms a layer (each
7-9 unfused ops in transformers, with ``weight.float()`` recomputed every call), rotary
embedding (``rotate_half``), residual adds, the router's softmax/top-k/renormalise chain and
GELU times up. Each op here does one such chain in **one Triton launch**:

=====================  =========================================================================
:func:`rms_norm`       ``x * (mean(x^2) + eps)^-0.5 * weight`` (weight fp32, prepared once; or none)
:func:`qkv_norm_rope`  per-head q/k/v RMSNorm + RoPE of one fused q|k|v projection, written
                       through strides into ``q_out`` and into K/V cache slots (views)
:func:`residual_norms` ``h + norm(x)``, then 1-3 norms of the new residual with different weights
:func:`gelu_mul`       ``gelu_tanh(gate) * up`` from the ``(..., 2I)`` gate|up product
:func:`router_topk`    softmax over experts, top-k, renormalise, per-expert scale
:func:`ffn_combine`    ``(h + norm(norm(m) + norm(e))) * layer_scalar``
=====================  =========================================================================

Numerics: every op reads its inputs in the model dtype and does its arithmetic in fp32, and
rounds to the model dtype exactly where transformers' modules do (a norm's output, the
residual sum, each product of the rotary embedding, ...), so on bf16 the result equals the
unfused reference up to the odd last-bit difference of a reduction order, and on fp32 to a few
ulps. Rounding to bf16 is done by hand (round to nearest even on the bits) because
``TRITON_INTERPRET=1``'s float32 -> bfloat16 cast truncates: the interpreter and the GPU give
the same bits.

Backend (:func:`backend`): Triton when the tensor is on CUDA and triton imports, or on any
device while ``TRITON_INTERPRET=1`` (so a CPU step takes the same kernels it takes on CUDA and
can be counted without a GPU); the torch fallback otherwise. ``DIFFGEN_FUSED_BACKEND=torch`` or
``=triton`` (read at every call) forces one, for A/B runs on a GPU. The Triton kernels live in
:mod:`diffgen.kernels.fused_triton`, imported on first use; every launch is wrapped in
:func:`diffgen.kernels.launches.launch` (which counts it). Output buffers are allocated inside
that wrapper: ``torch.empty`` launches no kernel on a GPU, so a counting dispatch mode must not
count it either. Shapes and grids come from static sizes only: no host sync, no data-dependent
shape, capturable in a CUDA graph.

Why our own kernels and not liger-kernel (its public source read 2026-12, version 0.8.5 current): it
is not installed here, and the GPU machines have torch, transformers, accelerate and triton only
(no pip, no network), so a dependency could not run there. Its ``LigerRMSNorm(offset=0.0,
casting_mode="gemma")`` does compute Gemma 4's formula (fp32 throughout, weight not offset), but
as a training ``autograd.Function`` (it also writes the per-row ``rstd`` for the backward pass)
with libdevice's approximate ``rsqrt``; its RoPE is a separate kernel over separate q/k tensors.
Neither fuses what cuts the launch count here: q/k/v norm + RoPE + the strided write into the
KV cache in one launch, the residual add with several norms of its result, the three-norm
combine, the router's softmax/top-k. (Not run under the interpreter: it is not installed.) The
kernels here are short row-wise programs; the fused set is what matters.

Weights: pass fp32 tensors prepared once at load (:func:`prepare_weight`); a bf16 weight works
too (it is read and widened in the kernel) but the torch fallback then casts it every call.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

BACKENDS = ("triton", "torch")
#: Environment variable read at every call: ``torch`` or ``triton`` forces that backend.
BACKEND_ENV = "DIFFGEN_FUSED_BACKEND"


# -- backend choice ------------------------------------------------------------------------------


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (it is optional: the torch fallbacks need none)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken install raising at import
        return False
    return True


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (Triton kernels then run on any device)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs(device: torch.device | str) -> bool:
    """Whether Triton kernels run for tensors on ``device``: CUDA with triton importable, or any
    device while ``TRITON_INTERPRET=1``. Read at call time (not cached: tests flip the variable)."""
    device_type = torch.device(device).type
    return (device_type == "cuda" or interpreting()) and triton_available()


def backend(tensor: Tensor | torch.device | str) -> str:
    """``"triton"`` or ``"torch"`` for ops on ``tensor`` (or a device).

    ``DIFFGEN_FUSED_BACKEND=torch|triton`` overrides the choice (forcing ``triton`` where it
    cannot run raises). Otherwise Triton where :func:`triton_runs`, torch elsewhere.
    """
    device = tensor.device if isinstance(tensor, Tensor) else torch.device(tensor)
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced == "torch":
        return "torch"
    runs = triton_runs(device)
    if forced == "triton" and not runs:
        raise RuntimeError(f"{BACKEND_ENV}=triton, but Triton kernels do not run on {device.type} tensors here "
                           f"(they need CUDA and triton, or TRITON_INTERPRET=1)")
    if forced not in ("", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be 'torch' or 'triton', got {forced!r}")
    return "triton" if runs else "torch"


def _kernels():
    """:mod:`diffgen.kernels.fused_triton`, imported on first use. Triton decides at decoration time
    whether a kernel is interpreted: if ``TRITON_INTERPRET`` changed since the module was imported
    (tests, kernel counting), it is imported afresh so the kernels follow the variable."""
    from diffgen.kernels import fused_triton

    if fused_triton.INTERPRETED != interpreting():
        fused_triton = importlib.reload(fused_triton)
    return fused_triton


def prepare_weight(weight: Tensor | None, scale: float | Tensor | None = None) -> Tensor | None:
    """A norm weight as the fused ops want it: fp32, contiguous, detached; times ``scale`` if given.

    Call once at load, e.g. ``prepare_weight(router.scale, router.hidden_size ** -0.5)`` for the
    router's input norm (transformers rounds ``norm(x) * scale * hidden**-0.5`` to the model dtype
    twice more; the fused op rounds once).
    """
    if weight is None:
        return None
    w = weight.detach().to(torch.float32)
    if scale is not None:
        w = w * scale
    return w.contiguous()


def _check_weight(weight: Tensor | None, size: int, name: str) -> None:
    if weight is not None and weight.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(weight.shape)}")


# -- 1. rms_norm ---------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``(x.float() * (mean(x.float()^2) + eps)^-0.5 * weight).to(x.dtype)`` over the last dim.

    ``weight``: fp32 ``(D,)`` (or ``None``: no scale; Gemma 4's weight is not offset by 1).
    Triton: one launch.
    """
    _check_weight(weight, x.shape[-1], "weight")
    if backend(x) == "triton":
        return _kernels().rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """The fallback: ``F.rms_norm`` on the fp32 input (one fused kernel on CUDA/MPS in recent torch;
    5-6 ops on the CPU), then the cast back."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


# -- 2. qkv_norm_rope ----------------------------------------------------------------------------


def qkv_norm_rope(qkv: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, *, heads: int,
                  kv_heads: int, head_dim: int, eps: float, has_v: bool, q_out: Tensor, k_out: Tensor,
                  v_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head RMSNorm + RoPE of a fused q|k|v projection, written into ``q_out``, ``k_out``, ``v_out``.

    Args:
        qkv: ``(B, S, heads*D + kv_heads*D [+ kv_heads*D])``, the output of one q|k|v product
            (last dim contiguous).
        q_weight, k_weight: fp32 ``(D,)`` q_norm / k_norm weights.
        cos, sin: ``(B or 1, S, D)`` from the model's rotary embedding (any strides).
        heads, kv_heads, head_dim: H, KV, D.
        eps: the norms' epsilon.
        has_v: whether ``qkv`` has a v part; without one (full-attention layers, no v_proj) the
            value is the *raw* k projection, as in transformers.
        q_out: ``(B, H, S, D)``; k_out, v_out: ``(B, KV, S, D)``, any strides (e.g. slices of a
            ``(B, KV, capacity, D)`` cache along dim 2): written through their strides.

    ``q = rope(norm(q) * q_weight)``, ``k = rope(norm(k) * k_weight)``, ``v = norm(v)`` (no
    scale), with ``rope(x) = x * cos + rotate_half(x) * sin``. Returns ``(q_out, k_out, v_out)``.
    Triton: one launch for all three.
    """
    batch, seq, width = qkv.shape
    parts = heads + kv_heads * (2 if has_v else 1)
    if width != parts * head_dim:
        raise ValueError(f"qkv's last dim must be (heads + kv_heads{' * 2' if has_v else ''}) * head_dim = "
                         f"{parts * head_dim}, got {width}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate_half, got {head_dim}")
    _check_weight(q_weight, head_dim, "q_weight")
    _check_weight(k_weight, head_dim, "k_weight")
    for name, out, h in (("q_out", q_out, heads), ("k_out", k_out, kv_heads), ("v_out", v_out, kv_heads)):
        if out.shape != (batch, h, seq, head_dim):
            raise ValueError(f"{name} must have shape {(batch, h, seq, head_dim)}, got {tuple(out.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1:] != (seq, head_dim):
            raise ValueError(f"{name} must have shape ({batch} or 1, {seq}, {head_dim}), got {tuple(t.shape)}")
    if backend(qkv) == "triton":
        _kernels().qkv_norm_rope(qkv, q_weight, k_weight, cos, sin, heads, kv_heads, head_dim, eps, has_v,
                                 q_out, k_out, v_out)
    else:
        qkv_norm_rope_torch(qkv, q_weight, k_weight, cos, sin, heads, kv_heads, head_dim, eps, has_v,
                            q_out, k_out, v_out)
    return q_out, k_out, v_out


def qkv_norm_rope_torch(qkv: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, heads: int,
                        kv_heads: int, head_dim: int, eps: float, has_v: bool, q_out: Tensor, k_out: Tensor,
                        v_out: Tensor) -> None:
    """The fallback: one norm over every head, q and k scaled and rotated together (transformers'
    bf16 arithmetic for the rotary part), three strided copies."""
    batch, seq, _ = qkv.shape
    h, kv, d = heads, kv_heads, head_dim
    x = qkv.unflatten(-1, (-1, d))
    normed = F.rms_norm(x.float(), (d,), None, eps)
    w = torch.cat((q_weight.expand(h, d), k_weight.expand(kv, d)))
    qk = (normed[:, :, : h + kv] * w).to(qkv.dtype)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    rotated = qk * c + torch.cat((-qk[..., d // 2:], qk[..., : d // 2]), dim=-1) * s
    q_out.copy_(rotated[:, :, :h].transpose(1, 2))
    k_out.copy_(rotated[:, :, h:].transpose(1, 2))
    v_out.copy_((normed[:, :, h + kv:] if has_v else normed[:, :, h: h + kv]).transpose(1, 2))


# -- 3. residual_norms ---------------------------------------------------------------------------


def residual_norms(h: Tensor, x: Tensor, post_weight: Tensor | None, weights: Sequence[Tensor | None],
                   eps: float) -> tuple[Tensor, list[Tensor]]:
    """``h_new = h + rms_norm(x, post_weight)``; ``outs[i] = rms_norm(h_new, weights[i])``.

    ``h``, ``x``: ``(..., D)`` in the model dtype (same shape); ``post_weight`` and each of the
    1-3 ``weights``: fp32 ``(D,)`` or ``None``. The norm of ``x`` is rounded to the model dtype
    before the add and ``h_new`` after it, as transformers' ``residual + norm(x)`` does.
    Returns ``(h_new, [outs])``. Triton: one launch.
    """
    if h.shape != x.shape:
        raise ValueError(f"h and x must have one shape, got {tuple(h.shape)} and {tuple(x.shape)}")
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"residual_norms takes 1 to 3 weights, got {len(weights)}")
    size = h.shape[-1]
    _check_weight(post_weight, size, "post_weight")
    for i, w in enumerate(weights):
        _check_weight(w, size, f"weights[{i}]")
    if backend(h) == "triton":
        return _kernels().residual_norms(h, x, post_weight, list(weights), eps)
    return residual_norms_torch(h, x, post_weight, weights, eps)


def residual_norms_torch(h: Tensor, x: Tensor, post_weight: Tensor | None, weights: Sequence[Tensor | None],
                         eps: float) -> tuple[Tensor, list[Tensor]]:
    """The fallback: the normalisation of ``h_new`` is shared by its weighted copies."""
    size = h.shape[-1]
    h_new = h + rms_norm_torch(x, post_weight, eps)
    normed = F.rms_norm(h_new.float(), (size,), None, eps)
    return h_new, [(normed * w if w is not None else normed).to(h.dtype) for w in weights]


# -- 4. gelu_mul ---------------------------------------------------------------------------------


def gelu_mul(gate_up: Tensor) -> Tensor:
    """``gelu_tanh(gate) * up`` from ``(..., 2I)`` (gate the first half), in the input dtype.

    As transformers' ``act_fn(gate) * up`` with ``gelu_pytorch_tanh``: the GELU is rounded to
    the dtype before the product. Triton: one launch.
    """
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate | up), got {gate_up.shape[-1]}")
    if backend(gate_up) == "triton":
        return _kernels().gelu_mul(gate_up)
    return gelu_mul_torch(gate_up)


def gelu_mul_torch(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# -- 5. router_topk ------------------------------------------------------------------------------


def router_topk(scores: Tensor, per_expert_scale: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The router's tail: ``softmax`` (fp32) over experts, top-``k``, renormalised to sum 1, times
    ``per_expert_scale[index]`` (as ``DiffusionGemmaTextRouter``).

    ``scores``: ``(..., E)`` router logits in any float dtype; ``per_expert_scale``: ``(E,)``
    (fp32 prepared once, or the parameter). Returns ``(weights, index)``: fp32 ``(T, k)`` and
    int64 ``(T, k)``, ``T`` the product of the leading dims, each row by descending probability.
    Ties: the lower expert index first in the Triton kernel; torch.topk's order in the fallback.
    Triton: one launch.
    """
    experts = scores.shape[-1]
    if not 0 < k <= experts:
        raise ValueError(f"k must be in [1, {experts}], got {k}")
    if per_expert_scale.shape != (experts,):
        raise ValueError(f"per_expert_scale must have shape ({experts},), got {tuple(per_expert_scale.shape)}")
    if backend(scores) == "triton":
        return _kernels().router_topk(scores, per_expert_scale, k)
    return router_topk_torch(scores, per_expert_scale, k)


def router_topk_torch(scores: Tensor, per_expert_scale: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The fallback: transformers' router tail, op for op (so its expert choice and tie order)."""
    probs = torch.softmax(scores.reshape(-1, scores.shape[-1]), dim=-1, dtype=torch.float32)
    weights, index = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[index], index


# -- 6. ffn_combine ------------------------------------------------------------------------------


def ffn_combine(h: Tensor, m: Tensor, e: Tensor, w1: Tensor | None, w2: Tensor | None, w_post: Tensor | None,
                layer_scalar: Tensor, eps: float) -> Tensor:
    """``(h + rms_norm(rms_norm(m, w1) + rms_norm(e, w2), w_post)) * layer_scalar``.

    ``h`` the residual, ``m`` the dense MLP output, ``e`` the experts' output (any shape with
    ``h``'s number of elements and last dim, e.g. ``(T, D)`` flat), all in the model dtype;
    weights fp32 ``(D,)`` or ``None``; ``layer_scalar`` a 1-element tensor. Rounded to the model
    dtype after each norm, the sum, the residual add and the scaling, as transformers' layer
    does. Returns a new tensor of ``h``'s shape. Triton: one launch.
    """
    size = h.shape[-1]
    if m.shape[-1] != size or e.shape[-1] != size or m.numel() != h.numel() or e.numel() != h.numel():
        raise ValueError(f"m and e must hold h's {tuple(h.shape)} elements with last dim {size}, "
                         f"got {tuple(m.shape)} and {tuple(e.shape)}")
    if layer_scalar.numel() != 1:
        raise ValueError(f"layer_scalar must have one element, got shape {tuple(layer_scalar.shape)}")
    for name, w in (("w1", w1), ("w2", w2), ("w_post", w_post)):
        _check_weight(w, size, name)
    if backend(h) == "triton":
        return _kernels().ffn_combine(h, m, e, w1, w2, w_post, layer_scalar, eps)
    return ffn_combine_torch(h, m, e, w1, w2, w_post, layer_scalar, eps)


def ffn_combine_torch(h: Tensor, m: Tensor, e: Tensor, w1: Tensor | None, w2: Tensor | None,
                      w_post: Tensor | None, layer_scalar: Tensor, eps: float) -> Tensor:
    """The fallback: transformers' arithmetic, three norms (each ``F.rms_norm`` + casts)."""
    mixed = rms_norm_torch(m, w1, eps).reshape(h.shape) + rms_norm_torch(e, w2, eps).reshape(h.shape)
    out = h + rms_norm_torch(mixed, w_post, eps)
    return out.mul_(layer_scalar)
