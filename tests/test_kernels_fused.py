"""The fused row-wise ops (diffgen.kernels.fused) against transformers' unfused modules and formulas.

Every op runs on both backends: the torch fallback, and the Triton kernels under
``TRITON_INTERPRET=1`` (set with monkeypatch before the first launch; ``fused`` imports its
kernel module afresh when the variable changed, so the kernels are the interpreter's). fp32 must
agree to a few ulps, bf16 to within one bf16 step (and mostly bit for bit: the kernels round to
bf16 where transformers does). Shapes stay small: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import platform

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.activations import ACT2FN
from transformers.models.diffusion_gemma import modeling_diffusion_gemma as dg

from diffgen.kernels import fused, launches

EPS = 1e-6
# The interpreter evaluates in numpy, which warns where exp overflows to inf (GELU's far tail: intended).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
TRITON_PLATFORM = platform.system() == "Linux" and platform.machine() == "x86_64"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Which backend the ops take: the torch fallback, or the Triton kernels in the interpreter."""
    monkeypatch.delenv(fused.BACKEND_ENV, raising=False)
    if request.param == "triton":
        if not TRITON_PLATFORM or not fused.triton_available():
            pytest.skip("triton is not installed here (it ships wheels for Linux x86_64)")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert fused.backend(torch.empty(1)) == request.param
    return request.param


def close(got: torch.Tensor, want: torch.Tensor, label: str = "", atol: float = 0.0) -> None:
    """fp32: a few ulps (+ ``atol``). bf16: at most one bf16 step (+ ``atol``) apart everywhere, and
    bit-equal at >= 98% of the entries above ``atol`` (in practice all: the kernels round where
    transformers rounds)."""
    assert got.dtype == want.dtype and got.shape == want.shape, label
    got, want = got.float(), want.float()
    if "bfloat16" in label:
        size = torch.maximum(got.abs(), want.abs())
        _, exponent = torch.frexp(size)
        step = torch.pow(2.0, (exponent - 8).float())
        assert bool(((got - want).abs() <= step + atol).all()), label
        above = size > atol
        assert float((got[above] == want[above]).float().mean()) >= 0.98, label
    else:
        torch.testing.assert_close(got, want, atol=2e-6 + atol, rtol=2e-6, msg=label)


def norm_module(size: int, dtype: torch.dtype, with_scale: bool = True) -> dg.DiffusionGemmaRMSNorm:
    module = dg.DiffusionGemmaRMSNorm(size, eps=EPS, with_scale=with_scale)
    if with_scale:
        module.weight.data = torch.randn(size) * 0.5 + 1.0
    return module.to(dtype).requires_grad_(False)


def weight_of(module: dg.DiffusionGemmaRMSNorm) -> torch.Tensor | None:
    return fused.prepare_weight(module.weight) if module.with_scale else None


DTYPES = [torch.float32, torch.bfloat16]


# -- 1. rms_norm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,with_scale", [((3, 5, 8), True), ((4, 16), False), ((2, 256), True),
                                              ((1, 2, 2816), True), ((3, 40), True)])
def test_rms_norm_matches_transformers(backend, dtype, shape, with_scale):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    module = norm_module(shape[-1], dtype, with_scale)
    close(fused.rms_norm(x, weight_of(module), EPS), module(x), f"{backend} {shape} {dtype}")


def test_rms_norm_reads_strided_rows(backend):
    x = torch.randn(6, 64)[::2, :24]  # row stride 128, last dim contiguous
    module = norm_module(24, torch.float32)
    close(fused.rms_norm(x, weight_of(module), EPS), module(x))


# -- 2. qkv_norm_rope ----------------------------------------------------------------------------


def qkv_reference(qkv, q_norm, k_norm, cos, sin, heads, kv_heads, head_dim, has_v):
    """transformers' DiffusionGemma attention, from the projections to the rotated states."""
    batch, seq, _ = qkv.shape
    q = qkv[..., : heads * head_dim].view(batch, seq, heads, head_dim)
    k = qkv[..., heads * head_dim: (heads + kv_heads) * head_dim].view(batch, seq, kv_heads, head_dim)
    v = qkv[..., (heads + kv_heads) * head_dim:].view(batch, seq, kv_heads, head_dim) if has_v else k
    v_norm = dg.DiffusionGemmaRMSNorm(head_dim, eps=EPS, with_scale=False)
    q = dg.apply_rotary_pos_emb(q_norm(q), cos, sin, unsqueeze_dim=2).transpose(1, 2)
    k = dg.apply_rotary_pos_emb(k_norm(k), cos, sin, unsqueeze_dim=2).transpose(1, 2)
    return q, k, v_norm(v).transpose(1, 2)


QKV_CASES = [  # batch, seq, heads, kv_heads, head_dim, has_v, cos batch
    (2, 3, 4, 2, 8, True, 1),
    (1, 2, 2, 1, 16, False, 1),
    (2, 2, 2, 1, 256, True, 2),
    (1, 2, 4, 1, 512, False, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", QKV_CASES,
                         ids=lambda c: f"B{c[0]}S{c[1]}H{c[2]}KV{c[3]}D{c[4]}{'v' if c[5] else 'k=v'}")
def test_qkv_norm_rope_matches_transformers_and_writes_into_cache_views(backend, dtype, case):
    batch, seq, heads, kv_heads, head_dim, has_v, cos_batch = case
    gen = torch.Generator().manual_seed(2)
    width = (heads + kv_heads * (2 if has_v else 1)) * head_dim
    qkv = (torch.randn(batch, seq, width, generator=gen) * 2).to(dtype)
    # Partial ("proportional") rope: cos = 1, sin = 0 on the last quarter of each half.
    angles = torch.rand(cos_batch, seq, head_dim // 2, generator=gen) * 6
    angles[..., 3 * head_dim // 8:] = 0
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q_norm, k_norm = norm_module(head_dim, dtype), norm_module(head_dim, dtype)
    want = qkv_reference(qkv, q_norm, k_norm, cos, sin, heads, kv_heads, head_dim, has_v)

    capacity, offset = seq + 5, 3
    sentinel = -7.0
    q_out = torch.empty(batch, heads, seq, head_dim, dtype=dtype)
    k_cache = torch.full((batch, kv_heads, capacity, head_dim), sentinel, dtype=dtype)
    v_cache = torch.full((batch, kv_heads, capacity, head_dim), sentinel, dtype=dtype)
    k_view, v_view = k_cache[:, :, offset: offset + seq], v_cache[:, :, offset: offset + seq]
    got = fused.qkv_norm_rope(qkv, weight_of(q_norm), weight_of(k_norm), cos, sin, heads=heads,
                              kv_heads=kv_heads, head_dim=head_dim, eps=EPS, has_v=has_v, q_out=q_out,
                              k_out=k_view, v_out=v_view)
    assert got[0] is q_out and got[1] is k_view and got[2] is v_view
    label = f"{backend} {case} {dtype}"
    for name, g, w in zip("qkv", (q_out, k_view, v_view), want):
        close(g, w, f"{name} {label}")
    # Nothing outside the slots was touched.
    for cache in (k_cache, v_cache):
        outside = torch.cat((cache[:, :, :offset], cache[:, :, offset + seq:]), dim=2)
        assert bool((outside == sentinel).all()), label


def test_qkv_norm_rope_with_fp32_cos_on_bf16_states(backend):
    # transformers then computes the rotation in fp32 (type promotion) and the cache holds bf16.
    batch, seq, heads, kv_heads, head_dim = 2, 2, 2, 1, 16
    qkv = torch.randn(batch, seq, (heads + 2 * kv_heads) * head_dim).to(torch.bfloat16)
    angles = torch.rand(1, seq, head_dim // 2) * 6
    angles = torch.cat((angles, angles), dim=-1)
    q_norm, k_norm = norm_module(head_dim, torch.bfloat16), norm_module(head_dim, torch.bfloat16)
    want = qkv_reference(qkv, q_norm, k_norm, angles.cos(), angles.sin(), heads, kv_heads, head_dim, True)
    q_out = torch.empty(batch, heads, seq, head_dim, dtype=torch.bfloat16)
    k_out, v_out = torch.empty_like(q_out[:, :1]), torch.empty_like(q_out[:, :1])
    fused.qkv_norm_rope(qkv, weight_of(q_norm), weight_of(k_norm), angles.cos(), angles.sin(), heads=heads,
                        kv_heads=kv_heads, head_dim=head_dim, eps=EPS, has_v=True, q_out=q_out, k_out=k_out,
                        v_out=v_out)
    for g, w in zip((q_out, k_out, v_out), want):
        close(g, w.to(torch.bfloat16), "bfloat16")


def test_qkv_norm_rope_takes_a_q_out_in_any_layout(backend):
    batch, seq, heads, kv_heads, head_dim = 1, 3, 2, 1, 8
    qkv = torch.randn(batch, seq, (heads + 2 * kv_heads) * head_dim)
    cos, sin = torch.randn(1, seq, head_dim), torch.randn(1, seq, head_dim)
    q_norm, k_norm = norm_module(head_dim, torch.float32), norm_module(head_dim, torch.float32)
    want = qkv_reference(qkv, q_norm, k_norm, cos, sin, heads, kv_heads, head_dim, True)
    q_out = torch.empty(batch, seq, heads, head_dim).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    k_out, v_out = torch.empty(batch, kv_heads, seq, head_dim), torch.empty(batch, kv_heads, seq, head_dim)
    fused.qkv_norm_rope(qkv, weight_of(q_norm), weight_of(k_norm), cos, sin, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, eps=EPS, has_v=True, q_out=q_out, k_out=k_out, v_out=v_out)
    for g, w in zip((q_out, k_out, v_out), want):
        close(g, w)


# -- 3. residual_norms ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,outs", [((2, 3, 24), 3), ((1, 2, 2816), 3), ((5, 40), 1), ((3, 16), 2)])
def test_residual_norms_match_transformers_layer_arithmetic(backend, dtype, shape, outs):
    gen = torch.Generator().manual_seed(3)
    size = shape[-1]
    h, x = (torch.randn(shape, generator=gen) * 4).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    post = norm_module(size, dtype)
    modules = [norm_module(size, dtype), norm_module(size, dtype, with_scale=False), norm_module(size, dtype)][:outs]
    h_want = h + post(x)
    got_h, got = fused.residual_norms(h, x, weight_of(post), [weight_of(m) for m in modules], EPS)
    label = f"{backend} {shape} {dtype}"
    close(got_h, h_want, label)
    assert len(got) == outs
    for g, m in zip(got, modules):
        close(g, m(h_want), label)


def test_residual_norms_router_weight_matches_the_router_input(backend):
    # The router's input: norm(h) * scale * hidden**-0.5, as one weight prepared at load.
    size = 24
    h, x = torch.randn(4, size), torch.randn(4, size)
    config = dg.DiffusionGemmaTextConfig(hidden_size=size, num_experts=8, top_k_experts=2)
    router = dg.DiffusionGemmaTextRouter(config).requires_grad_(False)
    router.scale.data = torch.rand(size) + 0.5
    h_new, (routed,) = fused.residual_norms(h, x, None, [fused.prepare_weight(router.scale, size ** -0.5)], EPS)
    close(routed, router.norm(h_new) * router.scale * router.scalar_root_size)


# -- 4. gelu_mul ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 2 * 8), (2, 3, 2 * 40), (2, 2 * 704), (1, 2 * 2112)])
def test_gelu_mul_matches_gelu_pytorch_tanh_times_up(backend, dtype, shape):
    gen = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(shape, generator=gen) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    # atol: in the far negative tail (|gelu| < ~1e-4) torch's 1 + tanh(z) cancels (and is exactly 0
    # once tanh rounds to -1) where the kernel's gate / (1 + exp(-2z)) keeps the true value.
    close(fused.gelu_mul(gate_up), ACT2FN["gelu_pytorch_tanh"](gate) * up, f"{backend} {shape} {dtype}", atol=2e-5)


def test_gelu_mul_is_finite_and_exact_in_the_tails(backend):
    gate = torch.tensor([-1e4, -60.0, -10.0, 0.0, 10.0, 60.0, 1e4])
    got = fused.gelu_mul(torch.cat((gate, torch.ones(7))))
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ACT2FN["gelu_pytorch_tanh"](gate), atol=1e-6, rtol=1e-6)


# -- 5. router_topk ------------------------------------------------------------------------------


def router_tail_reference(scores, per_expert_scale, k):
    """DiffusionGemmaTextRouter.forward after its projection, verbatim."""
    router_probabilities = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
    top_k_weights, top_k_index = torch.topk(router_probabilities, k=k, dim=-1)
    top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True)
    return top_k_weights * per_expert_scale[top_k_index], top_k_index


@pytest.mark.parametrize("tokens,experts,k", [(6, 128, 8), (5, 12, 3), (2, 128, 1)])
def test_router_topk_matches_the_transformers_router(backend, tokens, experts, k):
    # fp32 end to end through the module itself (random scores: no ties within a row).
    size = 16
    config = dg.DiffusionGemmaTextConfig(hidden_size=size, num_experts=experts, top_k_experts=k)
    router = dg.DiffusionGemmaTextRouter(config).requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    router.proj.weight.data = torch.randn(experts, size, generator=gen)
    router.per_expert_scale.data = torch.rand(experts, generator=gen) + 0.5
    hidden = torch.randn(tokens, size, generator=gen)
    _, want_w, want_i = router(hidden)
    # The router's own scores (the fused forward computes them with the same product).
    scores = router.proj(router.norm(hidden) * router.scale * router.scalar_root_size)
    weights, index = fused.router_topk(scores, fused.prepare_weight(router.per_expert_scale), k)
    assert weights.dtype == torch.float32 and index.dtype == torch.int64 and index.shape == (tokens, k)
    assert torch.equal(index, want_i)  # the same experts, by descending probability
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tokens,experts,k", [(4, 128, 8), (3, 12, 3)])
def test_router_topk_on_bf16_scores_matches_the_router_tail(backend, tokens, experts, k):
    # Distinct bf16 scores in each row (multiples of 1/32: exact in bf16), a bf16 per-expert scale.
    gen = torch.Generator().manual_seed(7)
    scores = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)]).sub(experts // 2)
    scores = (scores / 32).to(torch.bfloat16).view(tokens // 2 or 1, -1, experts) if tokens % 2 == 0 else (
        scores / 32).to(torch.bfloat16)
    scale = (torch.rand(experts, generator=gen) + 0.5).to(torch.bfloat16)
    want_w, want_i = router_tail_reference(scores.reshape(-1, experts), scale, k)
    weights, index = fused.router_topk(scores, scale, k)  # a bf16 scale: widened in the op
    assert torch.equal(index, want_i)
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-6)


# -- 6. ffn_combine ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 24), (1, 2, 2816), (4, 40)])
def test_ffn_combine_matches_the_transformers_layer_tail(backend, dtype, shape):
    gen = torch.Generator().manual_seed(6)
    size = shape[-1]
    h = (torch.randn(shape, generator=gen) * 4).to(dtype)
    m, e = torch.randn(shape, generator=gen).to(dtype), (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    n1, n2, post = norm_module(size, dtype), norm_module(size, dtype), norm_module(size, dtype)
    layer_scalar = torch.tensor([0.625]).to(dtype)
    # DiffusionGemmaDecoderTextLayer: post_feedforward_layernorm(norm_1(mlp) + norm_2(experts)), residual, scalar.
    want = h + post(n1(m) + n2(e))
    want *= layer_scalar
    got = fused.ffn_combine(h, m, e.reshape(-1, size), weight_of(n1), weight_of(n2), weight_of(post), layer_scalar,
                            EPS)
    assert got.shape == h.shape
    close(got, want, f"{backend} {shape} {dtype}")


# -- launches and op counts ----------------------------------------------------------------------


class CountOps(TorchDispatchMode):
    """Non-view aten ops outside Triton launches (what would be extra kernels on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not launches.inside() and not func.is_view and func.overloadpacket.__name__ not in ("empty", "empty_like"):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _calls(dtype=torch.bfloat16):
    h, x = torch.randn(2, 24).to(dtype), torch.randn(2, 24).to(dtype)
    w = torch.randn(24)
    qkv = torch.randn(1, 2, 4 * 8).to(dtype)
    cos, sin = torch.randn(1, 2, 8).to(dtype), torch.randn(1, 2, 8).to(dtype)
    q = torch.empty(1, 2, 2, 8, dtype=dtype)
    k, v = torch.empty(1, 1, 2, 8, dtype=dtype), torch.empty(1, 1, 2, 8, dtype=dtype)
    scale = torch.ones(1, dtype=dtype)
    return {
        "rms_norm": lambda: fused.rms_norm(x, w, EPS),
        "qkv_norm_rope": lambda: fused.qkv_norm_rope(qkv, w[:8], w[:8], cos, sin, heads=2, kv_heads=1, head_dim=8,
                                                     eps=EPS, has_v=True, q_out=q, k_out=k, v_out=v),
        "residual_norms": lambda: fused.residual_norms(h, x, w, [w, None, w], EPS),
        "gelu_mul": lambda: fused.gelu_mul(h),
        "router_topk": lambda: fused.router_topk(h, w, 8),
        "ffn_combine": lambda: fused.ffn_combine(h, x, x, w, w, w, scale, EPS),
    }


def test_each_triton_op_is_one_launch_and_nothing_else(monkeypatch):
    if not TRITON_PLATFORM or not fused.triton_available():
        pytest.skip("triton is not installed here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name, call in _calls().items():
        before = launches.COUNTS.copy()
        with CountOps() as counter:
            call()
        assert launches.COUNTS - before == {name: 1}, name
        assert counter.ops == [], (name, counter.ops)


def test_the_torch_fallbacks_take_few_ops(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # bf16 inputs, fp32 weights (on the CPU; F.rms_norm is one fused kernel on CUDA and MPS).
    budget = {"rms_norm": 8, "qkv_norm_rope": 18, "residual_norms": 21, "gelu_mul": 2, "router_topk": 7,
              "ffn_combine": 27}
    for name, call in _calls().items():
        with CountOps() as counter:
            call()
        assert len(counter.ops) <= budget[name], (name, counter.ops)


def test_the_backend_follows_the_environment(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(fused.BACKEND_ENV, "torch")
    assert fused.backend(torch.empty(1)) == "torch"
    monkeypatch.setenv(fused.BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused.backend(torch.empty(1))
    monkeypatch.setenv(fused.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=fused.BACKEND_ENV):
        fused.backend(torch.empty(1))
    monkeypatch.delenv(fused.BACKEND_ENV)
    assert fused.backend(torch.empty(1)) == "torch"
    if TRITON_PLATFORM and fused.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert fused.backend(torch.empty(1)) == "triton"
        monkeypatch.setenv(fused.BACKEND_ENV, "torch")
        assert fused.backend(torch.empty(1)) == "torch"


def test_bad_arguments_are_refused():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, torch.ones(7), EPS)
    with pytest.raises(ValueError, match="qkv"):
        fused.qkv_norm_rope(torch.randn(1, 2, 24), torch.ones(8), torch.ones(8), torch.ones(1, 2, 8),
                            torch.ones(1, 2, 8), heads=2, kv_heads=1, head_dim=8, eps=EPS, has_v=True,
                            q_out=torch.empty(1, 2, 2, 8), k_out=torch.empty(1, 1, 2, 8), v_out=torch.empty(1, 1, 2, 8))
    with pytest.raises(ValueError, match="1 to 3"):
        fused.residual_norms(x, x, None, [None] * 4, EPS)
    with pytest.raises(ValueError, match="k must"):
        fused.router_topk(x, torch.ones(8), 9)
    with pytest.raises(ValueError, match="layer_scalar"):
        fused.ffn_combine(x, x, x, None, None, None, torch.ones(2), EPS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_kernels_on_cuda_match_the_fallbacks_and_capture_in_a_graph(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(fused.BACKEND_ENV, raising=False)
    dtype, dev = torch.bfloat16, "cuda"
    h, x = torch.randn(256, 2816, device=dev).to(dtype), torch.randn(256, 2816, device=dev).to(dtype)
    w = torch.randn(2816, device=dev)
    ref_h, ref = fused.residual_norms_torch(h, x, w, [w, None, w], EPS)
    got_h, got = fused.residual_norms(h, x, w, [w, None, w], EPS)
    for g, r in zip([got_h, *got], [ref_h, *ref]):
        close(g, r, "cuda bfloat16")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused.rms_norm(x, w, EPS)
    x.copy_(torch.randn_like(x))
    graph.replay()
    close(captured, fused.rms_norm_torch(x, w, EPS), "cuda bfloat16")
