"""Grouped quantised experts: same results as the dequantised per-expert reference, every path,
and no host sync in the forward (so a denoising step can be graph-captured).

Tolerances (relative to the reference's largest entry): fp32 activations 1e-5 (the same products
summed in another order), bf16 activations 2e-2 (the reference rounds each dequantised weight to
bf16 before its product; the grouped paths keep int8/e4m3 values exact and scale in fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffgen.kernels import moe
from diffgen.loading.quant import QuantizedExperts, QuantizedLinear, QuantizedStack

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_experts(scheme, experts=8, hidden=64, inter=24, dtype=torch.float32, seed=0):
    """A QuantizedExperts filled from random weights, as the streaming loader fills it."""
    torch.manual_seed(seed)
    original = SimpleNamespace(gate_up_proj=torch.empty(experts, 2 * inter, hidden),
                               act_fn=torch.nn.functional.gelu)
    module = QuantizedExperts(original, scheme, dtype, "cpu")
    module.store("gate_up_proj", torch.randn(experts, 2 * inter, hidden) / hidden ** 0.5)
    module.store("down_proj", torch.randn(experts, hidden, inter) / inter ** 0.5)
    return module


def make_routing(tokens, experts, top_k, dtype=torch.float32, seed=1):
    """Uneven routing: expert loads skewed, experts 3 and 6 (when present) get no token at all."""
    generator = torch.Generator().manual_seed(seed)
    popularity = torch.linspace(4.0, 0.5, experts)
    popularity[[e for e in (3, 6) if e < experts]] = 0.0
    index = torch.multinomial(popularity.expand(tokens, -1), top_k, replacement=False, generator=generator)
    weights = torch.rand(tokens, top_k, generator=generator).softmax(dim=-1)
    hidden = torch.randn(tokens, 64, generator=generator).to(dtype)
    return hidden, index, weights


def reference(module, hidden, index, weights):
    """The pre-grouped forward: dequantise each expert, loop over experts, index_add (fp32)."""
    final = torch.zeros(hidden.shape, dtype=torch.float32)
    for expert in range(module.num_experts):
        token, slot = torch.where(index == expert)
        if token.numel() == 0:
            continue
        state = hidden[token].float()
        gate, up = torch.nn.functional.linear(state, module.gate_up_proj.weight(expert).float()).chunk(2, dim=-1)
        out = torch.nn.functional.linear(module.act_fn(gate) * up, module.down_proj.weight(expert).float())
        final.index_add_(0, token, out * weights[token, slot, None])
    return final


def relative_error(actual, expected):
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8", "fp8", "nf4"])
def test_grouped_forward_matches_the_dequantised_reference_on_the_cpu(scheme, dtype):
    module = make_experts(scheme, dtype=dtype)
    hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=dtype)  # 111 pairs, uneven
    assert not torch.isin(torch.tensor([3, 6]), index).any()  # two experts with no token
    before = moe.LAUNCHES["torch"]
    out = module(hidden, index, weights)
    assert moe.LAUNCHES["torch"] == before + 2  # both projections took the torch path
    assert out.shape == hidden.shape and out.dtype == dtype
    assert relative_error(out, reference(module, hidden, index, weights)) < TOLERANCE[dtype]


def test_chunked_torch_path_is_the_same_as_one_chunk():
    """Bounding the dequantised memory (chunks of experts) changes nothing in the result."""
    module = make_experts("nf4")
    hidden, index, _ = make_routing(tokens=29, experts=8, top_k=2)
    perm, ends = moe.route(index, 8)
    stack = module.gate_up_proj
    rows = hidden[perm // 2]
    args = (rows, stack.q, stack.scale, stack.code, ends, "nf4", *stack.shape)
    whole = moe.grouped_mm_torch(*args)
    chunked = moe.grouped_mm_torch(*args, chunk_elements=3 * stack.shape.numel())  # 3 experts per chunk
    assert torch.equal(whole, chunked)


def test_both_ways_of_combining_expert_outputs_agree():
    """The CPU's one-pass index_add_ and the GPU's scatter-then-sum (no atomics) give one result."""
    torch.manual_seed(2)
    index = torch.stack([torch.randperm(6)[:3] for _ in range(11)])
    weights = torch.rand(11, 3)
    perm, _ = moe.route(index, 6)
    out = torch.randn(33, 5)
    expected = torch.zeros(11, 5)
    for row, pair in enumerate(perm.tolist()):
        expected[pair // 3] += out[row] * weights.reshape(-1)[pair]
    for accumulate in (True, False):
        assert torch.allclose(moe.combine(out, weights, perm, accumulate), expected, atol=1e-6)


def test_route_sorts_pairs_by_expert_with_end_offsets():
    index = torch.tensor([[2, 0], [2, 4], [0, 1]])
    perm, ends = moe.route(index, 6)
    assert ends.dtype == torch.int32 and ends.tolist() == [2, 3, 5, 5, 6, 6]
    assert index.reshape(-1)[perm].tolist() == [0, 0, 1, 2, 2, 4]
    assert perm.tolist() == [1, 4, 5, 0, 2, 3]  # stable: a token's pairs keep their order


def test_dequantisation_paths_agree_with_bitsandbytes():
    """moe.dequantize (bitsandbytes' CPU kernel) and moe.nf4_dequantize (torch) give the same
    values for a stack (both are checked against bitsandbytes in tests/test_quant.py)."""
    stack = QuantizedStack("nf4", 3, 16, 128, torch.float32, "cpu")
    for index in range(3):
        stack.store(index, torch.randn(16, 128))
    native = moe.dequantize(stack.q, stack.scale, stack.code, "nf4", 16, 128, torch.float32)
    assert torch.equal(native, moe.nf4_dequantize(stack.q, stack.scale, stack.code, 16, 128, torch.float32))
    assert torch.equal(native[1], stack.weight(1))


def test_nf4_code_table_lives_on_the_device_and_the_saved_layout_is_unchanged():
    stack = QuantizedStack("nf4", 2, 8, 64, torch.float32, "cpu")
    assert stack.code is not None and stack.code.device == stack.q.device and stack.code.numel() == 16
    assert set(stack.state_dict()) == {"q", "scale"}  # the code table is not saved
    assert set(QuantizedStack("int8", 2, 8, 64, torch.float32, "cpu").state_dict()) == {"q", "scale"}


# -- no host sync ---------------------------------------------------------------------------------------


def looped_forward(module, hidden_states, top_k_index, top_k_weights):
    """The old per-expert forward: the negative control of the sync checks."""
    final = torch.zeros_like(hidden_states)
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=module.num_experts).permute(2, 1, 0)
    for expert in mask.sum(dim=(-1, -2)).nonzero().flatten().tolist():
        slot, token = torch.where(mask[expert])
        gate, up = torch.nn.functional.linear(hidden_states[token], module.gate_up_proj.weight(expert)).chunk(2, -1)
        out = torch.nn.functional.linear(module.act_fn(gate) * up, module.down_proj.weight(expert))
        final.index_add_(0, token, out * top_k_weights[token, slot, None])
    return final


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_forward_traces_as_one_graph(scheme):
    """dynamo with fullgraph=True refuses data-dependent ops (.item(), .tolist(), nonzero,
    one-argument where, bool(tensor)): the grouped forward traces whole; the old loop does not."""
    import torch._dynamo

    module = make_experts(scheme)
    hidden, index, weights = make_routing(tokens=16, experts=8, top_k=2)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    assert relative_error(compiled(hidden, index, weights), reference(module, hidden, index, weights)) < 1e-5
    torch._dynamo.reset()
    looped = torch.compile(lambda *a: looped_forward(module, *a), fullgraph=True, backend="eager")
    with pytest.raises(Exception):
        looped(hidden, index, weights)
    torch._dynamo.reset()


# -- the Triton kernel, under the interpreter --------------------------------------------------------

INTERPRETED = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_quant_grouped import looped_forward, make_experts, make_routing, reference, relative_error
    from diffgen.kernels import moe
    from diffgen.loading.quant import QuantizedLinear

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"host sync: {{name}}")
        return call

    class NoHostSync:  # Tensor.item/tolist/__bool__/nonzero and torch.nonzero (all wait for the device) raise
        names = ("item", "tolist", "__bool__", "nonzero")

        def __enter__(self):
            self.saved = {{name: getattr(torch.Tensor, name) for name in self.names}}, torch.nonzero
            for name in self.names:
                setattr(torch.Tensor, name, refuse(name))
            torch.nonzero = refuse("torch.nonzero")

        def __exit__(self, *exc):
            for name, fn in self.saved[0].items():
                setattr(torch.Tensor, name, fn)
            torch.nonzero = self.saved[1]

    results = []
    for scheme, dtype in [("int8", torch.float32), ("fp8", torch.float32), ("nf4", torch.float32),
                          ("nf4", torch.bfloat16), ("int8", torch.bfloat16)]:
        module = make_experts(scheme, dtype=dtype)
        hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=dtype)
        with NoHostSync():
            out = module(hidden, index, weights)
        results.append({{"scheme": scheme, "dtype": str(dtype),
                         "error": relative_error(out, reference(module, hidden, index, weights))}})
    try:  # the negative control: the old loop syncs
        with NoHostSync():
            looped_forward(module, hidden, index, weights)
        loop_refused = False
    except AssertionError:
        loop_refused = True

    # the nf4 table lookups the GPU sweep compares (LUT 2 is the default above): same values
    stack = make_experts("nf4").gate_up_proj
    x = torch.randn(40, 64)
    ends = torch.tensor([0, 7, 7, 20, 21, 33, 40, 40], dtype=torch.int32)
    expected = moe.grouped_mm_torch(x, stack.q, stack.scale, stack.code, ends, "nf4", 48, 64)
    for lut in (0, 1):
        out = moe.grouped_mm_triton(x, stack.q, stack.scale, stack.code, ends, "nf4", 48, 64, config={{"LUT": lut}})
        results.append({{"scheme": f"nf4-lut{{lut}}", "dtype": "torch.float32", "error": relative_error(out, expected)}})

    # one-group product (nf4-all linears): rows split over programs, blocks straddling rows (in=40)
    torch.manual_seed(3)
    for in_features in (128, 40):
        linear = QuantizedLinear(torch.nn.Linear(in_features, 48, bias=False), torch.float32, "cpu")
        linear.store(torch.randn(48, in_features))
        x = torch.randn(2, 45, in_features)
        expected = torch.nn.functional.linear(x, linear.stack.weight(0))
        results.append({{"scheme": f"nf4-linear-{{in_features}}", "dtype": "torch.float32",
                         "error": relative_error(linear(x), expected)}})
    print(json.dumps({{"results": results, "launches": dict(moe.LAUNCHES), "loop_refused": loop_refused}}))
""")


def test_triton_kernel_matches_the_reference_under_the_interpreter():
    """The Triton path (the one CUDA takes) on the CPU: same results as the reference, and a
    forward that never calls what waits for the device (the old loop, as control, does)."""
    pytest.importorskip("triton")  # a dev dependency on Linux x86-64 (pyproject); CI installs it
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    script = INTERPRETED.format(tests=str(ROOT / "tests"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # 5 expert layers x 2 projections + 2 lookups + 2 linears through the Triton kernel; torch
    # only for the lookups' one reference.
    assert report["launches"].get("triton") == 14 and report["launches"].get("torch") == 1
    assert report["loop_refused"]
    for row in report["results"]:
        assert row["error"] < TOLERANCE[getattr(torch, row["dtype"].split(".")[1])], row


# -- fp8 x fp8 (torch._scaled_grouped_mm) --------------------------------------------------------------


def emulated_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=None, out_dtype=None, **_):
    """torch._scaled_grouped_mm's 2D x 3D contract (checked) and arithmetic, for the CPU."""
    assert mat_a.dtype == mat_b.dtype == torch.float8_e4m3fn and mat_a.dim() == 2 and mat_b.dim() == 3
    assert mat_a.stride(-1) == 1 and mat_b.stride(-2) == 1  # a row-major, b column-major
    assert scale_a.shape == (mat_a.shape[0],) and scale_a.is_contiguous() and scale_a.dtype == torch.float32
    assert scale_b.shape == (mat_b.shape[0], mat_b.shape[2]) and scale_b.stride(1) == 1
    assert offs.dtype == torch.int32 and offs.shape == (mat_b.shape[0],) and out_dtype == torch.bfloat16
    out = torch.empty(mat_a.shape[0], mat_b.shape[2])
    start = 0
    for group, end in enumerate(offs.tolist()):
        a = mat_a[start:end].float() * scale_a[start:end, None]
        out[start:end] = a @ (mat_b[group].float() * scale_b[group][None, :])
        start = end
    return out.to(out_dtype)


def test_fp8_scaled_path_quantises_activations_per_row(monkeypatch):
    """The fp8 x fp8 path hands torch._scaled_grouped_mm what its 2D x 3D form wants (emulated
    here; the GPU test below runs the real one) and stays within fp8 activation rounding."""
    monkeypatch.setattr(torch, "_scaled_grouped_mm", emulated_scaled_grouped_mm, raising=False)
    monkeypatch.setattr(moe, "fp8_scaled_runs", lambda *args: True)
    module = make_experts("fp8", dtype=torch.bfloat16)
    hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=torch.bfloat16)
    before = moe.LAUNCHES["fp8_scaled"]
    out = module(hidden, index, weights)
    assert moe.LAUNCHES["fp8_scaled"] == before + 2
    assert relative_error(out, reference(module, hidden, index, weights)) < 0.08  # e4m3 activations: 3 mantissa bits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU tests above cover the logic)")
@pytest.mark.parametrize("scheme", ["int8", "fp8", "nf4"])
def test_grouped_forward_on_the_gpu(scheme):
    module = make_experts(scheme, dtype=torch.bfloat16).cuda()
    hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=torch.bfloat16)
    out = module(hidden.cuda(), index.cuda(), weights.cuda()).cpu()
    bound = 0.08 if scheme == "fp8" and moe.fp8_scaled_runs("cuda", torch.bfloat16, 48, 64) else 2e-2
    assert relative_error(out, reference(module.cpu(), hidden, index, weights)) < bound


# -- the Triton kernel, compiled for Hopper without a GPU ---------------------------------------------

COMPILE_SM90 = textwrap.dedent("""
    import json, re, subprocess, sys, tempfile
    from pathlib import Path
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from diffgen.kernels.moe import kernel_config
    from diffgen.kernels.moe_triton import grouped_wo_mm_kernel

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    report = []
    # The real layer: 256 tokens x top-8 over 128 experts; gate_up (1408, 2816), down (2816, 704).
    for fmt, storage, kind in [("int8", "i8", 0), ("fp8", "fp8e4nv", 0), ("nf4", "u8", 1)]:
        for n, k in [(1408, 2816), (2816, 704)]:
            cfg = kernel_config(2048, 128, n, k, fmt)
            signature = {"x_ptr": "*bf16", "q_ptr": f"*{storage}", "s_ptr": "*fp32", "code_ptr": "*fp32",
                         "pairs_ptr": "*i64", "ends_ptr": "*i32", "out_ptr": "*bf16", "N": "i32", "K": "i32", "M_SPLIT": "i32"}
            names = list(signature)
            constexprs = {"FMT": kind, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                          "F32_DOT": False, "EVEN_K": k % cfg["BLOCK_K"] == 0, "LUT": cfg["LUT"]}
            signature.update({name: "constexpr" for name in constexprs})
            # what triton's launcher specialises at run time: 16-divisible sizes, 16-aligned pointers
            attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in names if name != "M_SPLIT"}
            compiled = triton.compile(ASTSource(fn=grouped_wo_mm_kernel, signature=signature, constexprs=constexprs,
                                                attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin.name],
                                       capture_output=True, text=True, check=True).stdout
                sass = subprocess.run([str(tools / "nvdisasm"), cubin.name], capture_output=True, text=True,
                                      check=True).stdout
            report.append({"fmt": fmt, "n": n, "k": k, "registers": int(re.search(r"REG:(\\d+)", usage).group(1)),
                           "spills": sass.count("STL"), "tensor_core_ops": sass.count("HMMA")})
    print(json.dumps(report))
""")


def test_triton_kernel_compiles_for_hopper_without_spills():
    """The real compiler (not the interpreter) builds the kernel for sm_90 (H100/H200) with the
    default tiles of the real layer: no register spills, tensor-core products, and registers
    for at least two programs per multiprocessor (weight streams overlap)."""
    pytest.importorskip("triton")  # a dev dependency on Linux x86-64 (pyproject); CI installs it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", COMPILE_SM90], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in json.loads(result.stdout.strip().splitlines()[-1]):
        warps = moe.kernel_config(2048, 128, row["n"], row["k"], row["fmt"])["num_warps"]
        assert row["spills"] == 0 and row["tensor_core_ops"] > 0, row
        assert row["registers"] * 32 * warps * 2 <= 65536, row
