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

from diffgen.kernels import bf16_experts, expert_formats, grouped_torch, launches, moe, moe_config
from diffgen.kernels import capability as caps
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
    before = launches.GROUPED_PATHS["torch"]
    out = module(hidden, index, weights)
    assert launches.GROUPED_PATHS["torch"] == before + 2  # both projections took the torch path
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
    whole = grouped_torch.grouped_mm_torch(*args)
    chunked = grouped_torch.grouped_mm_torch(*args, chunk_elements=3 * stack.shape.numel())  # 3 experts per chunk
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
    """expert_formats.dequantize (bitsandbytes' CPU kernel) and expert_formats.nf4_dequantize (torch) give the same
    values for a stack (both are checked against bitsandbytes in tests/test_quant.py)."""
    stack = QuantizedStack("nf4", 3, 16, 128, torch.float32, "cpu")
    for index in range(3):
        stack.store(index, torch.randn(16, 128))
    native = expert_formats.dequantize(stack.q, stack.scale, stack.code, "nf4", 16, 128, torch.float32)
    assert torch.equal(native, expert_formats.nf4_dequantize(stack.q, stack.scale, stack.code, 16, 128, torch.float32))
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
    from diffgen.kernels import grouped_torch, launches, moe_launch
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
    expected = grouped_torch.grouped_mm_torch(x, stack.q, stack.scale, stack.code, ends, "nf4", 48, 64)
    for lut in (0, 1):
        out = moe_launch.grouped_mm_triton(x, stack.q, stack.scale, stack.code, ends, "nf4", 48, 64, config={{"LUT": lut}})
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
    print(json.dumps({{"results": results, "launches": dict(launches.GROUPED_PATHS), "loop_refused": loop_refused}}))
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


def test_fp8_defaults_to_the_weight_only_path(monkeypatch):
    """fp8 x fp8 (torch._scaled_grouped_mm) measured slower and 7x less accurate than the
    weight-only kernel: even where the card has it, fp8 stacks take the weight-only path unless
    DIFFGEN_FP8_SCALED=1."""
    monkeypatch.delenv("DIFFGEN_FP8_SCALED", raising=False)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", emulated_scaled_grouped_mm, raising=False)
    monkeypatch.setattr(moe, "fp8_scaled_runs", lambda *args: True)
    module = make_experts("fp8", dtype=torch.bfloat16)
    hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=torch.bfloat16)
    before = dict(launches.GROUPED_PATHS)
    out = module(hidden, index, weights)
    assert launches.GROUPED_PATHS["fp8_scaled"] == before.get("fp8_scaled", 0)
    assert launches.GROUPED_PATHS["torch"] == before.get("torch", 0) + 2
    assert relative_error(out, reference(module, hidden, index, weights)) < TOLERANCE[torch.bfloat16]


def test_fp8_scaled_path_quantises_activations_per_row(monkeypatch):
    """Behind DIFFGEN_FP8_SCALED=1, the fp8 x fp8 path hands torch._scaled_grouped_mm what its 2D
    x 3D form wants (emulated here; the GPU test below runs the real one) and stays within fp8
    activation rounding."""
    monkeypatch.setenv("DIFFGEN_FP8_SCALED", "1")
    monkeypatch.setattr(torch, "_scaled_grouped_mm", emulated_scaled_grouped_mm, raising=False)
    monkeypatch.setattr(moe, "fp8_scaled_runs", lambda *args: True)
    module = make_experts("fp8", dtype=torch.bfloat16)
    hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=torch.bfloat16)
    before = launches.GROUPED_PATHS["fp8_scaled"]
    out = module(hidden, index, weights)
    assert launches.GROUPED_PATHS["fp8_scaled"] == before + 2
    assert relative_error(out, reference(module, hidden, index, weights)) < 0.08  # e4m3 activations: 3 mantissa bits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU tests above cover the logic)")
@pytest.mark.parametrize("scheme", ["int8", "fp8", "nf4"])
def test_grouped_forward_on_the_gpu(scheme):
    module = make_experts(scheme, dtype=torch.bfloat16).cuda()
    hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=torch.bfloat16)
    out = module(hidden.cuda(), index.cuda(), weights.cuda()).cpu()
    scaled = moe_config.fp8_scaled_enabled() and caps.fp8_scaled_runs("cuda", torch.bfloat16, 48, 64)
    bound = 0.08 if scheme == "fp8" and scaled else 2e-2
    assert relative_error(out, reference(module.cpu(), hidden, index, weights)) < bound


# -- the Triton kernel, compiled for Hopper without a GPU ---------------------------------------------

COMPILE_SM90 = textwrap.dedent("""
    import json, re, subprocess, sys, tempfile
    from pathlib import Path
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from diffgen.kernels.moe_config import kernel_config
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
                          "F32_DOT": False, "EVEN_K": k % cfg["BLOCK_K"] == 0, "LUT": cfg["LUT"], "RNE": False}
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
        warps = moe_config.kernel_config(2048, 128, row["n"], row["k"], row["fmt"])["num_warps"]
        assert row["spills"] == 0 and row["tensor_core_ops"] > 0, row
        assert row["registers"] * 32 * warps * 2 <= 65536, row


COMPILE_SWAP = textwrap.dedent("""
    import json, re, subprocess, sys, tempfile
    from pathlib import Path
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from diffgen.kernels.expert_formats import WEIGHT_BYTES, kernel_format
    from diffgen.kernels.moe_config import tuned_config
    from diffgen.kernels.moe_triton import grouped_mm_swap_kernel

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # (capability, multiprocessors, shared memory a block may use): H100, RTX 5090 / DGX Spark class
    cards = {90: (132, 232448), 120: (170, 101376)}
    report = []
    for cc, fmt in [(90, "fp8"), (90, "int8"), (90, "nf4"), (90, "bf16"), (120, "fp8"), (120, "bf16")]:
        storage = {"int8": "i8", "fp8": "fp8e4nv", "nf4": "u8", "bf16": "bf16"}[fmt]
        # The real layer (256 tokens x top-8 over 128 experts): gate_up (1408, 2816) with the gather and
        # GELU*up fused, down (2816, 704) with the routing weight and unpermute fused.
        for n, k, act, gather, scatter in [(1408, 2816, 1, True, False), (2816, 704, 0, False, True)]:
            cfg = tuned_config(2048, 128, n, k, fmt, 2, WEIGHT_BYTES.get(fmt, 2), cards[cc], act=bool(act))
            signature = {"x_ptr": "*bf16", "rows_ptr": "*i64", "q_ptr": f"*{storage}",
                         "s_ptr": "*bf16" if fmt == "bf16" else "*fp32", "code_ptr": "*fp32", "pairs_ptr": "*i64",
                         "ends_ptr": "*i32", "rw_ptr": "*fp32", "out_ptr": "*fp32" if scatter else "*bf16",
                         "N": "i32", "K": "i32", "N_ROWS": "i32", "TILES_N": "i32", "WORK": "i32", "NUM_PROGRAMS": "i32"}
            names = list(signature)
            constexprs = {"FMT": kernel_format(fmt, k), "BLOCK_N": cfg["BLOCK_N"], "BLOCK_M": cfg["BLOCK_M"],
                          "BLOCK_K": cfg["BLOCK_K"], "F32_DOT": False, "EVEN_K": k % cfg["BLOCK_K"] == 0, "LUT": cfg["LUT"],
                          "GATHER": gather, "TOP_K": 8, "ACT": act, "SCATTER": scatter, "RNE": False}
            signature.update({name: "constexpr" for name in constexprs})
            attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in names
                     if name not in ("TILES_N", "WORK", "NUM_PROGRAMS")}
            compiled = triton.compile(ASTSource(fn=grouped_mm_swap_kernel, signature=signature, constexprs=constexprs,
                                                attrs=attrs), target=GPUTarget("cuda", cc, 32),
                                      options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin.name],
                                       capture_output=True, text=True, check=True).stdout
                sass = subprocess.run([str(tools / "nvdisasm"), cubin.name], capture_output=True, text=True,
                                      check=True).stdout
            report.append({"cc": cc, "fmt": fmt, "n": n, "k": k, "config": cfg, "shared": compiled.metadata.shared,
                           "shared_limit": cards[cc][1], "registers": int(re.search(r"REG:(\\d+)", usage).group(1)),
                           "spills": sass.count("STL"), "tensor_core_ops": sass.count("HMMA") + sass.count("HGMMA")})
    # the combine's last kernel (sum over k and cast) builds too
    from diffgen.kernels.moe_triton import sum_pairs_kernel
    triton.compile(ASTSource(fn=sum_pairs_kernel, signature={"pairs_ptr": "*fp32", "out_ptr": "*bf16", "H": "i32",
                                                             "TOP_K": "constexpr", "BLOCK_H": "constexpr", "RNE": "constexpr"},
                             constexprs={"TOP_K": 8, "BLOCK_H": 1024, "RNE": False}), target=GPUTarget("cuda", 90, 32))
    print(json.dumps(report))
""")


def test_tuned_kernel_compiles_for_hopper_and_consumer_cards_within_their_limits():
    """The tuned kernel with both fused epilogues, at the real layer's shapes and the tiles
    tuned_config picks for each card: sm_90 (H100/H200, 227 KiB of shared memory a block) and
    sm_120 (RTX 50xx, DGX Spark: 99 KiB) — no spills, tensor-core products, shared memory within
    the card's limit (else the launch fails there), registers for two programs a multiprocessor."""
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", COMPILE_SWAP], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in json.loads(result.stdout.strip().splitlines()[-1]):
        assert row["spills"] == 0 and row["tensor_core_ops"] > 0, row
        assert row["shared"] <= row["shared_limit"], row
        assert row["registers"] * 32 * row["config"]["num_warps"] * 2 <= 65536, row


# -- the tuned kernel, its fused epilogues and bf16 experts, under the interpreter ------------------------

INTERPRETED_TUNED = textwrap.dedent("""
    import collections, json, os, sys
    from types import SimpleNamespace
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    sys.path.insert(0, {tests!r})
    from test_quant_grouped import make_experts, make_routing, reference, relative_error
    from diffgen.kernels import bf16_experts, capability, launches

    class Kernels(TorchDispatchMode):  # non-view aten ops (diffgen's custom ops wrap one Triton launch each)
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if not launches.inside() and not func.is_view and not name.startswith("diffgen::"):
                self.ops[name.replace("aten::", "")] += 1
            return func(*args, **(kwargs or {{}}))

    def run(fn):
        before = dict(launches.COUNTS)
        with Kernels() as mode:
            out = fn()
        ran = {{k: v - before.get(k, 0) for k, v in launches.COUNTS.items() if v != before.get(k, 0)}}
        return out, dict(mode.ops), ran

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"host sync: {{name}}")
        return call

    class NoHostSync:
        names = ("item", "tolist", "__bool__", "nonzero")

        def __enter__(self):
            self.saved = {{name: getattr(torch.Tensor, name) for name in self.names}}
            for name in self.names:
                setattr(torch.Tensor, name, refuse(name))

        def __exit__(self, *exc):
            for name, fn in self.saved.items():
                setattr(torch.Tensor, name, fn)

    MODES = [("legacy", "unfused"), ("tuned", "unfused"), ("tuned", "fused")]
    quantised = []
    for scheme, dtype in [("int8", torch.float32), ("fp8", torch.float32), ("nf4", torch.float32),
                          ("fp8", torch.bfloat16), ("nf4", torch.bfloat16)]:
        module = make_experts(scheme, dtype=dtype)
        inputs = make_routing(tokens=37, experts=8, top_k=3, dtype=dtype)
        expected = reference(module, *inputs)
        outs, row = {{}}, {{"scheme": scheme, "dtype": str(dtype)}}
        for config, epilogue in MODES:
            os.environ["DIFFGEN_MOE_CONFIG"], os.environ["DIFFGEN_MOE_EPILOGUE"] = config, epilogue
            with NoHostSync():
                out, ops, ran = run(lambda: module(*inputs))
            outs[config, epilogue] = out
            row[f"{{config}}-{{epilogue}}"] = {{"error": relative_error(out, expected), "ops": ops, "launches": ran}}
        row["fused_vs_unfused"] = relative_error(outs["tuned", "fused"], outs["tuned", "unfused"].float())
        row["tuned_vs_legacy"] = relative_error(outs["tuned", "unfused"], outs["legacy", "unfused"].float())
        quantised.append(row)
    os.environ["DIFFGEN_MOE_CONFIG"], os.environ["DIFFGEN_MOE_EPILOGUE"] = "tuned", "fused"

    # bf16 experts: transformers' own module, its grouped_mm forward against diffgen's forward with
    # torch's grouped_mm declared slow (as on compute capability 8.x / 12.x): the Triton path.
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts
    capability.torch_grouped_mm_is_fast = lambda *args, **kwargs: False
    name = bf16_experts.register_experts_implementation()
    dense = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        config = SimpleNamespace(num_experts=8, hidden_size=64, moe_intermediate_size=24,
                                 hidden_activation="gelu_pytorch_tanh", _experts_implementation="grouped_mm")
        experts = DiffusionGemmaTextExperts(config)
        torch.manual_seed(5)
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.randn(8, 48, 64) / 8)
            experts.down_proj.copy_(torch.randn(8, 64, 24) / 24 ** 0.5)
        experts = experts.to(dtype)
        hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=dtype)
        with torch.no_grad():
            expected, _, _ = run(lambda: experts(hidden, index, weights))
            config._experts_implementation = name
            with NoHostSync():
                out, ops, ran = run(lambda: experts(hidden, index, weights))
        dense.append({{"dtype": str(dtype), "error": relative_error(out, expected.float()), "out_dtype": str(out.dtype),
                       "ops": ops, "launches": ran}})
    print(json.dumps({{"quantised": quantised, "dense": dense}}))
""")


def test_tuned_kernel_and_fused_epilogues_under_the_interpreter():
    """The tuned kernel (persistent grid, weights on the MMA's M side) and its fused epilogues give
    the legacy kernel's products; the fused forward is three Triton kernels (gate_up, down, the
    sum over k) and two torch ops (sort, searchsorted); bf16 experts forced onto the
    Triton path (torch's grouped_mm declared slow, as on cc 8.x / 12.x) match transformers' own
    grouped_mm experts forward, with no host sync."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    for name in ("DIFFGEN_MOE_CONFIG", "DIFFGEN_MOE_EPILOGUE", "DIFFGEN_BF16_EXPERTS", "DIFFGEN_FP8_SCALED"):
        env.pop(name, None)
    script = INTERPRETED_TUNED.format(tests=str(ROOT / "tests"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for row in report["quantised"]:
        tolerance = TOLERANCE[getattr(torch, row["dtype"].split(".")[1])]
        for mode in ("legacy-unfused", "tuned-unfused", "tuned-fused"):
            assert row[mode]["error"] < tolerance, row
        assert row["tuned_vs_legacy"] < 1e-5 and row["fused_vs_unfused"] < tolerance, row
        assert row["legacy-unfused"]["launches"] == {"grouped_wo_mm": 2}, row
        assert row["tuned-unfused"]["launches"] == {"grouped_mm": 2}, row
        assert row["tuned-fused"]["launches"] == {"moe_gate_up": 1, "moe_down": 1, "moe_sum_pairs": 1}, row
        assert row["tuned-fused"]["ops"] == {"sort": 1, "searchsorted": 1}, row  # five kernels a layer
        assert sum(row["tuned-unfused"]["ops"].values()) >= 9, row
    for row in report["dense"]:
        assert row["launches"] == {"moe_gate_up": 1, "moe_down": 1, "moe_sum_pairs": 1}, row
        assert row["out_dtype"] == row["dtype"], row
        assert row["error"] < TOLERANCE.get(getattr(torch, row["dtype"].split(".")[1]), 2e-2), row


# -- where torch's grouped_mm is fast (from its source) and where bf16 experts go ---------------------------


@pytest.mark.parametrize("capability, fast", [((9, 0), True), ((10, 0), True), ((10, 3), True), ((8, 0), False),
                                              ((8, 6), False), ((8, 9), False), ((11, 0), False), ((12, 0), False),
                                              ((12, 1), False)])
def test_torch_grouped_mm_is_fast_only_on_compute_capability_9_and_10(monkeypatch, capability, fast):
    """torch 2.9-2.13 (GroupedBlas.cpp): the grouped kernel for bf16 on majors 9 and 10 only; else
    the fallback that copies the offsets to the host (RTX 30xx/40xx, RTX 50xx, DGX Spark). There
    bf16 experts must take diffgen's Triton kernel (they take it wherever Triton runs: fewer kernels
    a layer; ``DIFFGEN_BF16_EXPERTS=torch`` is the A/B on 9.x/10.x); fp16/fp32 fall back everywhere."""
    monkeypatch.setattr(caps, "compute_capability", lambda index: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("DIFFGEN_BF16_EXPERTS", raising=False)
    assert caps.torch_grouped_mm_is_fast("cuda:0") is fast
    assert caps.torch_grouped_mm_is_fast("cuda:0", torch.float16) is False
    if caps.triton_runs("cuda"):
        assert bf16_experts.bf16_experts_backend("cuda:0", torch.bfloat16) == "triton"
        assert bf16_experts.bf16_experts_backend("cuda:0", torch.float16) == "triton"
        monkeypatch.setenv("DIFFGEN_BF16_EXPERTS", "torch")
        assert bf16_experts.bf16_experts_backend("cuda:0", torch.bfloat16) == "torch"
        monkeypatch.setenv("DIFFGEN_BF16_EXPERTS", "triton")
        assert bf16_experts.bf16_experts_backend("cuda:0", torch.bfloat16) == "triton"


def test_cpu_bf16_experts_keep_transformers_forward(monkeypatch):
    """On the CPU (no interpreter) torch's grouped_mm has no device to sync with: unquantised
    experts stay on transformers' grouped_mm forward (identical results)."""
    monkeypatch.delenv("DIFFGEN_BF16_EXPERTS", raising=False)
    assert caps.torch_grouped_mm_is_fast("cpu") == caps.grouped_mm_runs("cpu", torch.bfloat16)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert bf16_experts.bf16_experts_backend("cpu", torch.bfloat16) == "torch"


def test_unquantised_load_registers_diffgen_experts(tiny):
    """The unquantised loader selects diffgen's experts forward (transformers' grouped_mm where
    torch's kernel is fast, as here; the Triton kernel where torch would sync)."""
    for layer in (*tiny.model.model.decoder.layers, *tiny.model.model.encoder.language_model.layers):
        assert layer.experts.config._experts_implementation == bf16_experts.EXPERTS_IMPLEMENTATION


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter tests above cover the logic)")
def test_tuned_fused_and_bf16_triton_paths_on_the_gpu():
    """On the card: every config / epilogue of every format, and bf16 experts through the Triton
    kernel, within tolerance of the reference; the fused forward captured in a CUDA graph (no host
    sync) and replayed to the eager result. No fixtures: runs without pytest too."""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    saved = {name: os.environ.get(name) for name in ("DIFFGEN_MOE_CONFIG", "DIFFGEN_MOE_EPILOGUE", "DIFFGEN_BF16_EXPERTS")}
    try:
        for scheme in ("int8", "fp8", "nf4"):
            module = make_experts(scheme, dtype=torch.bfloat16)
            hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=torch.bfloat16)
            expected = reference(module, hidden, index, weights)
            module = module.cuda()
            inputs = (hidden.cuda(), index.cuda(), weights.cuda())
            for config, epilogue in (("legacy", "unfused"), ("tuned", "unfused"), ("tuned", "fused")):
                os.environ["DIFFGEN_MOE_CONFIG"], os.environ["DIFFGEN_MOE_EPILOGUE"] = config, epilogue
                out = module(*inputs)
                assert relative_error(out.cpu(), expected) < 2e-2, (scheme, config, epilogue)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = module(*inputs)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, module(*inputs)), scheme
        os.environ["DIFFGEN_MOE_CONFIG"], os.environ["DIFFGEN_MOE_EPILOGUE"] = "tuned", "fused"
        config = SimpleNamespace(num_experts=8, hidden_size=64, moe_intermediate_size=24,
                                 hidden_activation="gelu_pytorch_tanh", _experts_implementation=bf16_experts.register_experts_implementation())
        experts = DiffusionGemmaTextExperts(config)
        torch.manual_seed(5)
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.randn(8, 48, 64) / 8)
            experts.down_proj.copy_(torch.randn(8, 64, 24) / 24 ** 0.5)
        experts = experts.to("cuda", torch.bfloat16)
        hidden, index, weights = make_routing(tokens=37, experts=8, top_k=3, dtype=torch.bfloat16)
        inputs = (hidden.cuda(), index.cuda(), weights.cuda())
        with torch.no_grad():
            os.environ["DIFFGEN_BF16_EXPERTS"] = "torch"
            expected = experts(*inputs)
            os.environ["DIFFGEN_BF16_EXPERTS"] = "triton"
            out = experts(*inputs)
            assert relative_error(out, expected.float()) < 2e-2
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = experts(*inputs)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, experts(*inputs))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
