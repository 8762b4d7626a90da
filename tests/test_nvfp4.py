"""``--quant nvfp4``: NVIDIA's NVFP4 layout, quantised as ModelOpt quantises, and its grouped Triton kernel.

The kernel runs here on the CPU under ``TRITON_INTERPRET=1`` (in a subprocess: triton reads the
variable when a kernel is defined) and must give the dequantised reference's products: exactly
for one-hot rows over every byte and every e4m3 scale, and to accumulation order for real products.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffgen.kernels import nvfp4
from diffgen.loading.quant import QuantizedStack

ROOT = Path(__file__).resolve().parent.parent


def test_codes_round_to_nearest_with_ties_to_the_even_code_and_pack_low_nibble_first():
    values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 0.3, -0.3, -6.0, -0.0, 1.4])
    assert nvfp4.e2m1_codes(values).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 1, 9, 15, 8, 3]
    packed = nvfp4.pack(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x43]]  # even element in the low nibble
    assert nvfp4.unpack(packed).tolist() == [[1, 2, 3, 4]]


def test_quantize_is_modelopts_arithmetic_and_decodes_as_the_layouts_say():
    torch.manual_seed(0)
    weight = torch.randn(24, 64) * 0.02
    packed, scale, scale2 = nvfp4.quantize(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 32)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (24, 4)
    assert scale2 == weight.abs().amax() / (6 * 448)  # ModelOpt's weights_scaling_factor_2
    blocks = weight.view(24, 4, 16)
    assert torch.equal(scale, (blocks.abs().amax(-1) / (6 * scale2)).to(torch.float8_e4m3fn))
    # Decoding written out as ModelOpt's NVFP4QTensor.dequantize does it (low nibble = even column).
    table = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6])
    codes = torch.empty(24, 64, dtype=torch.long)
    codes[:, 0::2], codes[:, 1::2] = packed & 0x0F, packed >> 4
    expected = (table[codes].view(24, 4, 16) * (scale.float() * scale2).unsqueeze(-1)).view(24, 64)
    decoded = nvfp4.dequantize(packed[None], scale[None], scale2.expand(1, 24, 1), 24, 64, torch.float32)[0]
    # The same to one rounding: diffgen multiplies the exact e2m1 * e4m3 product by the global scale,
    # ModelOpt multiplies the two scales first.
    torch.testing.assert_close(decoded, expected, rtol=2**-23, atol=0)
    assert (decoded - weight).norm() / weight.norm() < 0.12
    # Quantising what it decodes to gives it back: the rounding is idempotent.
    again = nvfp4.quantize(decoded, scale2)
    assert torch.equal(again[0], packed) and torch.equal(again[1], scale)


def test_a_stack_stores_experts_in_exactly_the_nvfp4_layout():
    stack = QuantizedStack("nvfp4", 3, 32, 48, torch.float32, "cpu")
    assert {name: (tuple(t.shape), t.dtype) for name, t in stack.state_dict().items()} == {
        "q": ((3, 32, 24), torch.uint8), "scale": ((3, 32, 3), torch.float8_e4m3fn),
        "scale2": ((3, 32, 1), torch.float32)}
    weight = torch.randn(32, 48)
    stack.store(1, weight)
    packed, scale, scale2 = nvfp4.quantize(weight)
    assert torch.equal(stack.q[1], packed) and torch.equal(stack.scale[1], scale)
    assert torch.equal(stack.scale2[1], scale2.expand(32, 1))
    with pytest.raises(ValueError):
        QuantizedStack("nvfp4", 1, 8, 24, torch.float32, "cpu")  # rows of 24: not whole groups of 16


def test_the_kernel_decodes_with_bit_operations_and_no_table():
    from diffgen.kernels import nvfp4_triton

    pytest.importorskip("triton")
    source = inspect.getsource(nvfp4_triton.grouped_nvfp4_kernel.fn)
    parameters = list(inspect.signature(nvfp4_triton.grouped_nvfp4_kernel.fn).parameters)
    # Its only memory inputs are the activations, codes, scales, row scales and offsets: nothing to look up in.
    assert parameters[:6] == ["x_ptr", "q_ptr", "s_ptr", "s2_ptr", "ends_ptr", "out_ptr"]
    assert "bitcast=True" in source and "code" not in parameters


INTERPRETED = textwrap.dedent("""
    import json, torch
    from diffgen.kernels import launches, nvfp4
    from diffgen.loading.quant import QuantizedExperts

    results = []
    # 1. Every byte and every finite e4m3 scale, one-hot rows: the products are the weights, exactly.
    n, k = 64, 512
    q = torch.arange(n * k // 2, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, n, k // 2)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    scale = finite[torch.arange(n * k // 16) % len(finite)].view(1, n, k // 16).view(torch.float8_e4m3fn)
    scale2 = torch.full((1, n, 1), 2.0 ** -3)
    ends = torch.tensor([k], dtype=torch.int32)
    out = nvfp4.grouped_mm_nvfp4(torch.eye(k), q, scale, scale2, ends, n, k)
    reference = nvfp4.dequantize(q, scale, scale2, n, k, torch.float32)[0]
    results.append({"case": "every byte and scale", "equal": bool(torch.equal(out, reference.T))})

    # 2. Grouped products, empty experts, ragged shapes, masked k, fp32 and bf16 activations.
    torch.manual_seed(0)
    for experts, n, k, rows, config in ((5, 40, 48, 37, None), (4, 72, 80, 20, {"BLOCK_K": 64}),
                                        (1, 24, 32, 9, None)):
        stacks = [nvfp4.quantize(torch.randn(n, k)) for _ in range(experts)]
        q = torch.stack([s[0] for s in stacks])
        scale = torch.stack([s[1] for s in stacks])
        scale2 = torch.stack([s[2].expand(n, 1) for s in stacks]).contiguous()
        counts = torch.randint(0, 3, (experts,)) * (rows // max(experts, 1))
        counts[0] = 0
        counts[-1] = rows - counts[:-1].sum()
        ends = counts.cumsum(0).to(torch.int32)
        weights = nvfp4.dequantize(q, scale, scale2, n, k, torch.float32)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, k).to(dtype)
            out = nvfp4.grouped_mm_nvfp4(x, q, scale, scale2, ends, n, k, config)
            bounds = [0, *ends.tolist()]
            expected = torch.cat([x[bounds[e]:bounds[e + 1]].float() @ weights[e].to(dtype).float().T
                                  for e in range(experts)])
            error = float((out.float() - expected).norm() / expected.norm())
            results.append({"case": f"{experts}x{n}x{k} {dtype}", "error": error, "dtype": str(dtype)})

    # 3. The experts module, routed, through the op: the Triton path against the torch path.
    class Original(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(8, 64, 64))
            self.down_proj = torch.nn.Parameter(torch.randn(8, 64, 32))
            self.act_fn = torch.nn.GELU(approximate="tanh")

    module = QuantizedExperts(Original(), "nvfp4", torch.float32, "cpu")
    for name in ("gate_up_proj", "down_proj"):
        module.store(name, getattr(Original(), name).data)
    hidden = torch.randn(30, 64)
    index = torch.randint(0, 8, (30, 2))
    weights = torch.softmax(torch.randn(30, 2), -1)
    before = launches.COUNTS["grouped_nvfp4"]
    triton_out = module(hidden, index, weights)
    launched = launches.COUNTS["grouped_nvfp4"] - before
    for stack in (module.gate_up_proj, module.down_proj):
        stack.backend = "torch"
    torch_out = module(hidden, index, weights)
    results.append({"case": "experts module", "launched": launched,
                    "error": float((triton_out - torch_out).norm() / torch_out.norm()), "dtype": "torch.float32"})
    print(json.dumps(results))
""")


def test_the_kernel_matches_the_dequantised_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows[0] == {"case": "every byte and scale", "equal": True}
    for row in rows[1:]:
        assert row["error"] < (1e-6 if row["dtype"] == "torch.float32" else 1e-2), row
    assert rows[-1]["launched"] == 2  # one launch per projection


def test_the_nvfp4_experts_forward_traces_as_one_graph_and_matches_the_reference():
    """The grouped product is one custom op: dynamo with fullgraph=True traces the experts forward
    whole (no host sync in it), and the result is the per-expert loop over dequantised weights."""
    import torch._dynamo

    from tests.test_quant_grouped import make_experts, make_routing, reference, relative_error

    module = make_experts("nvfp4", inter=32)
    hidden, index, weights = make_routing(tokens=16, experts=8, top_k=2)
    expected = reference(module, hidden, index, weights)
    assert relative_error(module(hidden, index, weights), expected) < 1e-5
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    assert relative_error(compiled(hidden, index, weights), expected) < 1e-5
    torch._dynamo.reset()
