"""The counter-based noise and the fused sampler tail (diffgen.kernels).

* The noise is Philox4x32-10: checked against Random123's published known-answer vectors, for
  determinism, for independence across rows, canvases, steps and streams, and for uniformity.
* The torch backend of ``sample_tail`` is checked against the textbook formulas (softmax,
  ``Categorical`` entropy as ``sampling.token_entropy`` computes it, argmax, Gumbel-max with the
  reference noise) and, over many keys, against the softmax distribution itself.
* The Triton kernel runs under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set
  before triton is imported) and must give the torch backend's tokens.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffgen.denoise.sampling import token_entropy
from diffgen.kernels import noise, sampler
from diffgen.kernels.noise import STREAM_CANVAS, STREAM_GUMBEL, STREAM_RENOISE, step_keys, uniform_tokens

ROOT = Path(__file__).resolve().parents[1]

# Random123's kat_vectors for philox4x32 10: counter (4 words), key (2 words) -> output (4 words).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Chi-square critical values at p = 0.001 (a fixed seed makes each check deterministic; the
# bound only says how unlikely a correct generator would be to fail it).
CHI2_999 = {7: 24.32, 15: 37.70, 63: 103.4}


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts.double() - expected.double()) ** 2 / expected.double()).sum())


# -- Philox and the keys ---------------------------------------------------------------------


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = noise.philox4x32(*[torch.tensor([c]) for c in counter], *[torch.tensor([k]) for k in key])
    assert [int(w) for w in words] == list(expected)


def test_philox_on_many_counters_matches_one_at_a_time():
    # Vectorised evaluation (int64 wrap-around products) gives each lane's scalar result.
    counters = torch.tensor([0, 1, 2**31, 2**32 - 1, 12345])
    batch = noise.philox4x32(counters, 7, 0, 0, 0xDEADBEEF, 42)
    for i, c in enumerate(counters.tolist()):
        single = noise.philox4x32(c, 7, 0, 0, 0xDEADBEEF, 42)
        assert [int(w[i]) for w in batch] == [int(w) for w in single]


def test_keys_split_and_join_round_trip_every_int64():
    keys = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 0x1234_5678_9ABC_DEF0, -0x1234_5678])
    k0, k1 = noise.split_keys(keys)
    assert bool(((k0 >= 0) & (k0 < 2**32) & (k1 >= 0) & (k1 < 2**32)).all())
    assert torch.equal(noise.join_keys(k0, k1), keys)


def test_step_keys_are_deterministic_and_take_zero_d_device_tensors():
    seeds = torch.tensor([0, 1, 2**40 + 3, -7])
    as_ints = step_keys(seeds, 3, 5, STREAM_GUMBEL)
    as_tensors = step_keys(seeds, torch.tensor(3, dtype=torch.int32), torch.tensor(5), STREAM_GUMBEL)
    assert as_ints.dtype == torch.int64 and as_ints.shape == (4,)
    assert torch.equal(as_ints, as_tensors)
    assert torch.equal(as_ints, step_keys(seeds.clone(), 3, 5, STREAM_GUMBEL))
    # A row's key depends on its own seed only, not on its neighbours.
    assert torch.equal(step_keys(seeds[2:3], 3, 5, STREAM_GUMBEL), as_ints[2:3])


def test_step_keys_differ_across_seeds_canvases_steps_and_streams():
    seeds = torch.arange(64)
    keys = {
        (canvas, step, stream): step_keys(seeds, canvas, step, stream)
        for canvas in range(3) for step in range(5) for stream in (STREAM_CANVAS, STREAM_RENOISE, STREAM_GUMBEL)
    }
    everything = torch.cat(list(keys.values()))
    assert everything.unique().numel() == everything.numel() == 64 * 3 * 5 * 3


# -- uniform tokens --------------------------------------------------------------------------


def test_uniform_tokens_are_deterministic_in_range_and_per_row():
    keys = step_keys(torch.tensor([11, 12, 13]), 0, 0, STREAM_CANVAS)
    tokens = uniform_tokens(keys, 256, 1000)
    assert tokens.dtype == torch.int64 and tokens.shape == (3, 256)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 1000
    assert torch.equal(tokens, uniform_tokens(keys, 256, 1000))
    # Alone or in a batch, a row draws the same tokens; rows differ from each other.
    assert torch.equal(uniform_tokens(keys[1:2], 256, 1000)[0], tokens[1])
    assert not torch.equal(tokens[0], tokens[1]) and not torch.equal(tokens[1], tokens[2])
    # A shorter canvas is a prefix of a longer one (the counter is the position).
    assert torch.equal(uniform_tokens(keys, 7, 1000), tokens[:, :7])


def test_uniform_tokens_change_with_step_and_stream():
    seeds = torch.tensor([5])
    draws = [uniform_tokens(step_keys(seeds, 0, step, stream), 64, 2**18)
             for step in range(3) for stream in (STREAM_CANVAS, STREAM_RENOISE)]
    for i in range(len(draws)):
        for j in range(i):
            # Independent draws of 64 tokens from 262,144 agree on a position about 0.02% of the time.
            assert int((draws[i] == draws[j]).sum()) <= 2


def test_uniform_tokens_are_uniform():
    keys = step_keys(torch.arange(200), 0, 1, STREAM_RENOISE)
    tokens = uniform_tokens(keys, 256, 64)  # 51,200 draws over 64 values
    counts = torch.bincount(tokens.flatten(), minlength=64)
    assert chi_square(counts, torch.full((64,), tokens.numel() / 64)) < CHI2_999[63]
    # The full 32-bit range maps onto the whole vocabulary (top values are reachable too).
    big = uniform_tokens(keys, 256, 262_144)
    assert int(big.max()) > 262_144 * 0.999 and int(big.min()) < 262_144 * 0.001


# -- Gumbel noise ----------------------------------------------------------------------------


def test_gumbel_noise_is_finite_deterministic_and_standard():
    keys = step_keys(torch.arange(4), 2, 3, STREAM_GUMBEL)
    g = noise.gumbel(keys, 16, 1000)
    assert g.shape == (4, 16, 1000) and g.dtype == torch.float32
    assert bool(torch.isfinite(g).all())
    assert torch.equal(g, noise.gumbel(keys, 16, 1000))
    # Standard Gumbel: mean = Euler's gamma, variance = pi^2 / 6 (64,000 draws: s.e. 0.005, 0.01).
    assert abs(float(g.mean()) - 0.5772) < 0.03
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.06
    # Extreme uniforms stay strictly inside (0, 1): G is bounded by -log(-log(1 - 2**-24)).
    assert float(g.max()) <= 16.64 and float(g.min()) >= -math.log(-math.log(2.0**-24)) - 1e-4


def test_gumbel_noise_of_a_position_depends_on_its_row_key_and_position_only():
    keys = step_keys(torch.tensor([1, 2, 3]), 0, 1, STREAM_GUMBEL)
    g = noise.gumbel(keys, 8, 50)
    assert torch.equal(noise.gumbel(keys[2:], 8, 50)[0], g[2])
    assert torch.equal(noise.gumbel(keys, 3, 50), g[:, :3])
    assert not torch.equal(g[0, 0], g[0, 1]) and not torch.equal(g[0, 0], g[1, 0])


# -- the torch backend against the textbook formulas ------------------------------------------


def _inputs(batch=2, canvas=5, vocab=300, dtype=torch.float32, seed=0, scale=4.0):
    generator = torch.Generator().manual_seed(seed)
    raw = (torch.randn(batch, canvas, vocab, generator=generator) * scale).to(dtype)
    keys = step_keys(torch.arange(batch) + 100 * seed, 1, 2, STREAM_GUMBEL)
    temperature = torch.linspace(0.4, 0.8, batch)
    return raw, keys, temperature


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_the_textbook_formulas(softcap, dtype):
    raw, keys, temperature = _inputs(dtype=dtype)
    out = torch.empty(raw.shape, dtype=torch.bfloat16)
    sampled, argmax, entropy = sampler.sample_tail(raw, softcap=softcap, temperature=temperature, keys=keys,
                                                   self_conditioning_out=out, backend="torch")
    capped = raw.float() if softcap is None else torch.tanh(raw.float() / softcap) * softcap
    scaled = capped / temperature[:, None, None]
    assert torch.equal(argmax, torch.argmax(scaled, dim=-1))
    assert torch.allclose(entropy, token_entropy(scaled), atol=1e-5, rtol=1e-5)
    probs = torch.softmax(scaled, dim=-1)
    assert torch.allclose(entropy, -(probs * probs.log()).sum(-1), atol=1e-4, rtol=1e-4)
    assert torch.equal(sampled, torch.argmax(scaled + noise.gumbel(keys, raw.shape[1], raw.shape[2]), dim=-1))
    assert torch.equal(out, scaled.to(torch.bfloat16))
    assert sampled.dtype == argmax.dtype == torch.int64 and entropy.dtype == torch.float32


def test_torch_backend_gives_the_same_results_in_any_chunking():
    raw, keys, temperature = _inputs(batch=3, canvas=7, vocab=257)
    whole = sampler.torch_tail(raw, 30.0, temperature, keys, chunk_elements=1 << 20)
    for chunk in (1, 257 * 2, 257 * 5 + 3):
        parts = sampler.torch_tail(raw, 30.0, temperature, keys, chunk_elements=chunk)
        assert all(torch.equal(a, b) for a, b in zip(whole, parts))


def test_a_single_temperature_a_float_and_per_row_temperatures_agree():
    raw, keys, _ = _inputs()
    zero_d = sampler.sample_tail(raw, softcap=None, temperature=torch.tensor(0.7), keys=keys, backend="torch")
    floats = sampler.sample_tail(raw, softcap=None, temperature=0.7, keys=keys, backend="torch")
    per_row = sampler.sample_tail(raw, softcap=None, temperature=torch.tensor([0.7, 0.7]), keys=keys, backend="torch")
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(zero_d, floats, per_row))
    hotter = sampler.sample_tail(raw, softcap=None, temperature=torch.tensor([0.7, 2.0]), keys=keys, backend="torch")
    assert torch.equal(hotter[1][0], zero_d[1][0]) and bool((hotter[2][1] > zero_d[2][1]).all())


def test_auto_backend_on_the_cpu_is_the_torch_reference():
    raw, keys, temperature = _inputs()
    auto = sampler.sample_tail(raw, softcap=30.0, temperature=temperature, keys=keys)
    reference = sampler.torch_tail(raw, 30.0, temperature, keys)
    assert all(torch.equal(a, b) for a, b in zip(auto, reference))


def test_minus_infinity_logits_are_never_sampled_and_keep_the_entropy_finite():
    raw, keys, temperature = _inputs(vocab=40)
    raw[:, :, ::2] = float("-inf")
    sampled, argmax, entropy = sampler.sample_tail(raw, softcap=None, temperature=temperature, keys=keys,
                                                   backend="torch")
    assert bool((sampled % 2 == 1).all()) and bool((argmax % 2 == 1).all())
    assert torch.allclose(entropy, token_entropy(raw[:, :, 1::2].float() / temperature[:, None, None]), atol=1e-5)


def test_gumbel_max_draws_follow_the_softmax_distribution():
    # 20,000 draws (400 rows x 50 positions, one key per row) from one 8-way distribution.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    rows, canvas = 400, 50
    raw = logits.expand(rows, canvas, 8).contiguous()
    keys = step_keys(torch.arange(rows), 0, 1, STREAM_GUMBEL)
    sampled, argmax, _ = sampler.sample_tail(raw, softcap=None, temperature=torch.tensor(0.8), keys=keys,
                                             backend="torch")
    counts = torch.bincount(sampled.flatten(), minlength=8)
    expected = torch.softmax(logits / 0.8, dim=-1) * rows * canvas
    assert chi_square(counts, expected) < CHI2_999[7]
    assert bool((argmax == 0).all())


def test_bad_arguments_are_refused(monkeypatch):
    raw, keys, temperature = _inputs()
    with pytest.raises(ValueError, match="backend"):
        sampler.sample_tail(raw, softcap=None, temperature=temperature, keys=keys, backend="cuda")
    with pytest.raises(ValueError, match="keys"):
        sampler.sample_tail(raw, softcap=None, temperature=temperature, keys=keys[:1])
    with pytest.raises(ValueError, match="temperature"):
        sampler.sample_tail(raw, softcap=None, temperature=torch.ones(3), keys=keys)
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.empty(raw.shape[::-1]).transpose(0, 2)
        sampler.sample_tail(raw, softcap=None, temperature=temperature, keys=keys, self_conditioning_out=strided)
    # Outside the interpreter, the kernel needs CUDA tensors: CPU tensors get a clear refusal.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        sampler.sample_tail(raw, softcap=None, temperature=temperature, keys=keys, backend="triton")


# -- the Triton kernel under the interpreter ---------------------------------------------------

TRITON_PLATFORM = platform.system() == "Linux" and platform.machine() == "x86_64"

# Runs in a subprocess with TRITON_INTERPRET=1 set before triton is imported. The torch backend
# is replaced by a function that raises while the triton backend runs, and the kernel must be
# the interpreter's, so every result labelled "triton" came from the Triton code.
INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import triton.runtime.interpreter as interpreter
    from diffgen.kernels import noise, sampler

    def refuse(*args, **kwargs):
        raise AssertionError("the torch backend ran where the triton backend was asked for")

    cases = []
    generator = torch.Generator().manual_seed(0)
    keys = noise.step_keys(torch.tensor([3, 4]), 1, 2, noise.STREAM_GUMBEL)
    shapes = [(dtype, softcap, block, 300) for dtype in (torch.float32, torch.bfloat16) for softcap in (None, 30.0)
              for block in (128, 4096)]
    shapes.append((torch.bfloat16, 30.0, 64, 256))  # V a multiple of the block: no masked tail
    for dtype, softcap, block, vocab in shapes:
        raw = (torch.randn(2, 5, vocab, generator=generator) * 6).to(dtype)
        if softcap is None and block == 128:
            raw[0, 1, 17::5] = float("-inf")
        temperature = torch.tensor([0.45, 0.8])
        out_t = torch.empty(2, 5, vocab, dtype=torch.bfloat16)
        out_r = torch.empty_like(out_t)
        reference = sampler.torch_tail(raw, softcap, temperature, keys, out_r)
        saved, sampler.torch_tail = sampler.torch_tail, refuse
        try:
            got = sampler._triton_tail(raw, softcap, temperature, keys, out_t, block_v=block)
        finally:
            sampler.torch_tail = saved
        cases.append(dict(dtype=str(dtype), softcap=softcap, block=block, vocab=vocab, triton=got,
                          torch=reference, sc_triton=out_t, sc_torch=out_r))
    # An allowed-token restriction (--schema): soft-capped float32 logits with most of the
    # vocabulary at MASKED_LOGIT, drawn with softcap=None as the step does.
    from diffgen.denoise.step import restrict
    allowed = torch.rand(2, 5, 300, generator=generator) < 0.05
    allowed[..., 7] = True
    raw = restrict((torch.randn(2, 5, 300, generator=generator) * 6), allowed, 30.0)
    temperature = torch.tensor([0.45, 0.8])
    out_t = torch.empty(2, 5, 300, dtype=torch.bfloat16)
    out_r = torch.empty_like(out_t)
    reference = sampler.torch_tail(raw, None, temperature, keys, out_r)
    got = sampler._triton_tail(raw, None, temperature, keys, out_t, block_v=128)
    assert bool(allowed.gather(-1, got[0].unsqueeze(-1)).all()), "the kernel drew a masked token"
    assert bool(allowed.gather(-1, got[1].unsqueeze(-1)).all()), "the kernel's argmax is a masked token"
    cases.append(dict(dtype="restricted", softcap=None, block=128, vocab=300, triton=got, torch=reference,
                      sc_triton=out_t, sc_torch=out_r))
    raw = torch.randn(2, 5, 300, generator=generator)
    via_api = sampler.sample_tail(raw, softcap=30.0, temperature=torch.tensor(0.6), keys=keys, backend="triton")
    reference = sampler.sample_tail(raw, softcap=30.0, temperature=torch.tensor(0.6), keys=keys, backend="torch")
    kernel_type = type(sampler._kernel()).__name__
    assert isinstance(sampler._kernel(), interpreter.InterpretedFunction), kernel_type
    torch.save(dict(cases=cases, via_api=via_api, via_api_torch=reference, kernel_type=kernel_type), sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if not TRITON_PLATFORM:
        pytest.skip("triton ships wheels for Linux x86_64 only (the dev extra installs it there)")
    result_file = tmp_path_factory.mktemp("interpret") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, str(result_file)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(result_file)


def test_the_triton_kernel_ran_in_the_interpreter(interpreted):
    assert interpreted["kernel_type"] == "InterpretedFunction"
    assert len(interpreted["cases"]) == 10


def test_the_triton_kernel_samples_the_torch_backends_tokens(interpreted):
    for case in interpreted["cases"]:
        (sampled, argmax, entropy), (ref_sampled, ref_argmax, ref_entropy) = case["triton"], case["torch"]
        label = f"{case['dtype']} softcap={case['softcap']} block={case['block']} V={case['vocab']}"
        assert torch.equal(sampled, ref_sampled), label
        assert torch.equal(argmax, ref_argmax), label
        # Entropy within 1e-5 nats + 1e-5 relative (float32 online log-sum-exp vs torch's two passes).
        assert torch.allclose(entropy, ref_entropy, atol=1e-5, rtol=1e-5), label
    sampled, argmax, entropy = interpreted["via_api"]
    assert all(torch.equal(a, b) for a, b in zip((sampled, argmax), interpreted["via_api_torch"][:2]))


def test_the_triton_kernel_writes_the_self_conditioning_logits(interpreted):
    for case in interpreted["cases"]:
        got, want = case["sc_triton"].float(), case["sc_torch"].float()
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        # Equal within bf16 rounding: at most one bf16 step apart (the float32 values before the
        # cast may differ by a few ulps: tanh and 1/T are computed differently), and mostly equal.
        _, exponent = torch.frexp(torch.maximum(got.abs(), want.abs())[finite])
        step = torch.pow(2.0, (exponent - 8).float())
        assert bool(((got[finite] - want[finite]).abs() <= step).all())
        assert float((got[finite] == want[finite]).float().mean()) > 0.99


# -- on a GPU (skipped elsewhere; the CPU tests above cover the same code under the interpreter) --


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_triton_kernel_on_cuda_matches_the_torch_backend_and_captures_in_a_graph():
    raw, keys, temperature = _inputs(batch=2, canvas=64, vocab=70_000, dtype=torch.bfloat16)
    raw, keys, temperature = raw.cuda(), keys.cuda(), temperature.cuda()
    triton_out = sampler.sample_tail(raw, softcap=30.0, temperature=temperature, keys=keys, backend="triton")
    torch_out = sampler.sample_tail(raw, softcap=30.0, temperature=temperature, keys=keys, backend="torch")
    assert torch.equal(triton_out[1], torch_out[1])
    assert float((triton_out[0] == torch_out[0]).float().mean()) > 0.99
    assert torch.allclose(triton_out[2], torch_out[2], atol=1e-4, rtol=1e-4)
    seeds, step = torch.tensor([1, 2], device="cuda"), torch.tensor(0, device="cuda")
    graph = torch.cuda.CUDAGraph()
    sampler.sample_tail(raw, softcap=30.0, temperature=temperature, keys=keys)  # compile outside capture
    with torch.cuda.graph(graph):
        captured = sampler.sample_tail(raw, softcap=30.0, temperature=temperature,
                                       keys=step_keys(seeds, 0, step, STREAM_GUMBEL))
    for value in (3, 4):
        step.fill_(value)
        graph.replay()
        eager = sampler.sample_tail(raw, softcap=30.0, temperature=temperature,
                                    keys=step_keys(seeds, 0, value, STREAM_GUMBEL))
        assert all(torch.equal(a, b) for a, b in zip(captured, eager))


# -- keys derived in the kernels (the fast sampler's path: no torch ops for the keys) -----------

DERIVED_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from diffgen.kernels import launches, noise, sampler
    from diffgen.kernels.noise import STREAM_CANVAS, STREAM_GUMBEL, STREAM_RENOISE, step_keys, uniform_tokens
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not launches.inside() and not func.is_view:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(3)
    seeds = torch.tensor([5, -(2**62) + 7, 2**40 + 3])
    results = {}
    raw = torch.randn(3, 4, 300, generator=generator)
    temperature = torch.tensor(0.7)
    for name, canvas in (("0-d", torch.tensor(2)), ("per-row", torch.tensor([0, 3, 2**33 + 1]))):
        step = torch.tensor(5)
        derived = sampler.sample_tail(raw, softcap=30.0, temperature=temperature, seeds=seeds, canvas=canvas,
                                      step=step, backend="triton")
        keyed = sampler.sample_tail(raw, softcap=30.0, temperature=temperature,
                                    keys=step_keys(seeds, canvas, step, STREAM_GUMBEL), backend="triton")
        torch_side = sampler.sample_tail(raw, softcap=30.0, temperature=temperature, seeds=seeds, canvas=canvas,
                                         step=step, backend="torch")
        accepted = torch.rand(3, 37, generator=generator) < 0.5
        keep = torch.randint(0, 1000, (3, 37), generator=generator)
        tokens = {backend: sampler.noise_tokens(seeds, canvas, step, STREAM_RENOISE, 37, 262144, keep=keep,
                                                accepted=accepted, backend=backend) for backend in ("triton", "torch")}
        fresh = {backend: sampler.noise_tokens(seeds, canvas, 0, STREAM_CANVAS, 37, 1000, backend=backend)
                 for backend in ("triton", "torch")}
        reference = torch.where(accepted, keep, uniform_tokens(step_keys(seeds, canvas, step, STREAM_RENOISE), 37,
                                                                262144))
        results[name] = dict(derived=derived, keyed=keyed, torch=torch_side, tokens=tokens, reference=reference,
                             fresh=fresh, fresh_reference=uniform_tokens(step_keys(seeds, canvas, 0, STREAM_CANVAS),
                                                                         37, 1000))
    # Ops outside launches for a step's draw and renoise: the keys cost none.
    canvas, step = torch.tensor(1), torch.tensor(2)
    before = launches.COUNTS.copy()
    with Count() as counter:
        sampler.noise_tokens(seeds, canvas, step, STREAM_RENOISE, 37, 262144, keep=keep, accepted=accepted)
        sampler.sample_tail(raw, softcap=30.0, temperature=temperature, seeds=seeds, canvas=canvas, step=step)
    results["ops"] = [op for op in counter.ops if "empty" not in op]
    results["launches"] = dict(launches.COUNTS - before)
    torch.save(results, sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def derived(tmp_path_factory):
    if not TRITON_PLATFORM:
        pytest.skip("triton ships wheels for Linux x86_64 only (the dev extra installs it there)")
    result_file = tmp_path_factory.mktemp("derived") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", DERIVED_SCRIPT, str(result_file)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(result_file)


@pytest.mark.parametrize("canvas", ["0-d", "per-row"])
def test_keys_derived_in_the_kernel_are_step_keys(derived, canvas):
    case = derived[canvas]
    assert all(torch.equal(a, b) for a, b in zip(case["derived"], case["keyed"]))
    assert torch.equal(case["derived"][0], case["torch"][0]) and torch.equal(case["derived"][1], case["torch"][1])


@pytest.mark.parametrize("canvas", ["0-d", "per-row"])
def test_noise_tokens_kernel_draws_uniform_tokens_bit_for_bit(derived, canvas):
    case = derived[canvas]
    assert torch.equal(case["tokens"]["triton"], case["reference"])
    assert torch.equal(case["tokens"]["torch"], case["reference"])
    assert torch.equal(case["fresh"]["triton"], case["fresh_reference"])
    assert torch.equal(case["fresh"]["torch"], case["fresh_reference"])


def test_a_fast_steps_draw_and_renoise_take_two_launches_and_no_key_ops(derived):
    assert derived["launches"] == {"noise_tokens": 1, "sample_tail": 1}
    assert derived["ops"] == [], derived["ops"]


def test_noise_tokens_on_the_torch_backend_are_the_old_formulas():
    seeds, canvas, step = torch.tensor([1, 2]), torch.tensor([0, 4]), torch.tensor(3)
    keep, accepted = torch.zeros(2, 9, dtype=torch.long), torch.tensor([[True, False] * 4 + [True]] * 2)
    got = sampler.noise_tokens(seeds, canvas, step, STREAM_RENOISE, 9, 50, keep=keep, accepted=accepted,
                               backend="torch")
    tokens = uniform_tokens(step_keys(seeds, canvas, step, STREAM_RENOISE), 9, 50)
    assert torch.equal(got, torch.where(accepted, keep, tokens))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_derived_keys_on_cuda_replay_from_a_graph_with_the_step_counter():
    raw, _, temperature = _inputs(batch=2, canvas=64, vocab=70_000, dtype=torch.bfloat16)
    raw, temperature = raw.cuda(), temperature.cuda()
    seeds, canvas, step = torch.tensor([1, -2], device="cuda"), torch.tensor([0, 5], device="cuda"), \
        torch.tensor(1, device="cuda")
    keep = torch.zeros(2, 64, dtype=torch.long, device="cuda")
    accepted = torch.rand(2, 64, device="cuda") < 0.5

    def step_draws():
        tail = sampler.sample_tail(raw, softcap=30.0, temperature=temperature, seeds=seeds, canvas=canvas, step=step)
        tokens = sampler.noise_tokens(seeds, canvas, step, STREAM_RENOISE, 64, 262144, keep=keep, accepted=accepted)
        return (*tail, tokens)

    step_draws()  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step_draws()
    for value in (3, 4):
        step.fill_(value)
        graph.replay()
        keyed = sampler.sample_tail(raw, softcap=30.0, temperature=temperature,
                                    keys=step_keys(seeds, canvas, value, STREAM_GUMBEL))
        fresh = uniform_tokens(step_keys(seeds, canvas, value, STREAM_RENOISE), 64, 262144)
        tokens = torch.where(accepted, keep, fresh)
        assert all(torch.equal(a, b) for a, b in zip(captured[:3], keyed))
        assert torch.equal(captured[3], tokens)
