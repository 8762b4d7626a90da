"""One MoE layer's experts forward per variant: time, weight-read bandwidth, error, graph capture.

One random layer (DiffusionGemma's: 128 experts, hidden 2816, width 704; 256 tokens x top-8, so
~16 rows per expert) and the same routing for every variant. Variants (``VARIANTS``):

* ``bf16-torch`` — transformers' ``grouped_mm`` experts (torch's ``_grouped_mm``; off compute
  capability 9.x/10.x that is its host-syncing fallback); ``bf16-triton-*`` — the same module
  through diffgen's Triton kernel (``DIFFGEN_BF16_EXPERTS=triton``), as on consumer cards;
* ``<fmt>-tuned-fused`` (the default for int8 / fp8 / nf4 and for bf16 on consumer cards): the
  tuned kernel (weights on the MMA's M side, persistent grid) with the gather + activation fused
  into gate_up and the routing weight + unpermute into down's epilogue; ``-tuned-unfused`` the
  same kernel with separate torch ops; ``-legacy`` the first kernel (``DIFFGEN_MOE_CONFIG=legacy``);
* ``fp8-scaled`` — ``torch._scaled_grouped_mm`` fp8 x fp8 (``DIFFGEN_FP8_SCALED=1``, where the
  card has it; else it reports the weight-only path it fell to);
* ``int8-torch`` — dequantise every expert, then torch's grouped matmul (the torch fallback).

Per variant: the median of ``reps`` eager calls after warm-up (CUDA events on a GPU), the first
call (Triton compiles there), the median replay of a CUDA graph of the call (captured only if it
makes no host sync; a failure is reported), whether the call passes
``torch.cuda.set_sync_debug_mode("error")``, the kernels it launched, achieved GB/s (stored
weights and scales over the graph time, else the eager time) and the error relative to per-expert
fp32 products with the same (dequantised) weights.

Imports only torch, triton, transformers and diffgen's kernels / loading.quant, so it runs on a
GPU machine without pytest, typer or rich. One JSON line per variant:

    python bench/moe_grouped.py                         # cuda, bf16, the real layer
    python bench/moe_grouped.py --device cpu --tiny     # CPU dry run under the Triton interpreter, seconds
    python bench/moe_grouped.py --sweep                 # also tile overrides of the tuned kernel

From a script: ``import moe_grouped; rows = moe_grouped.run("cuda", tiny=False)``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REAL = {"tokens": 256, "top_k": 8, "experts": 128, "hidden": 2816, "inter": 704}
TINY = {"tokens": 8, "top_k": 2, "experts": 4, "hidden": 64, "inter": 32}
ENV = ("DIFFGEN_MOE_CONFIG", "DIFFGEN_MOE_EPILOGUE", "DIFFGEN_BF16_EXPERTS", "DIFFGEN_FP8_SCALED", "DIFFGEN_MOE_TUNE")
# name -> (scheme, environment at call time, backend of the quantised stacks)
VARIANTS = {
    "bf16-torch": ("bf16", {"DIFFGEN_BF16_EXPERTS": "torch"}, "auto"),
    "bf16-triton-tuned-fused": ("bf16", {"DIFFGEN_BF16_EXPERTS": "triton"}, "auto"),
    "bf16-triton-tuned-unfused": ("bf16", {"DIFFGEN_BF16_EXPERTS": "triton", "DIFFGEN_MOE_EPILOGUE": "unfused"}, "auto"),
    "bf16-triton-legacy": ("bf16", {"DIFFGEN_BF16_EXPERTS": "triton", "DIFFGEN_MOE_CONFIG": "legacy"}, "auto"),
    "fp8-tuned-fused": ("fp8", {}, "auto"),
    "fp8-tuned-unfused": ("fp8", {"DIFFGEN_MOE_EPILOGUE": "unfused"}, "auto"),
    "fp8-legacy": ("fp8", {"DIFFGEN_MOE_CONFIG": "legacy"}, "auto"),
    "fp8-scaled": ("fp8", {"DIFFGEN_FP8_SCALED": "1"}, "auto"),
    "int8-tuned-fused": ("int8", {}, "auto"),
    "int8-tuned-unfused": ("int8", {"DIFFGEN_MOE_EPILOGUE": "unfused"}, "auto"),
    "int8-legacy": ("int8", {"DIFFGEN_MOE_CONFIG": "legacy"}, "auto"),
    "nf4-tuned-fused": ("nf4", {}, "auto"),
    "nf4-legacy": ("nf4", {"DIFFGEN_MOE_CONFIG": "legacy"}, "auto"),
    "int8-torch": ("int8", {}, "torch"),
}
# --sweep: the tuned fused kernel with tile overrides (DIFFGEN_MOE_TUNE), for fp8 and bf16.
SWEEP = ({"BLOCK_M": 16}, {"BLOCK_M": 64}, {"num_stages": 2}, {"num_stages": 3}, {"num_warps": 8},
         {"PROGRAMS": 1 << 20}, {"BLOCK_N": 64}, {"BLOCK_K": 64})
for _scheme, _env in (("fp8", {}), ("bf16", {"DIFFGEN_BF16_EXPERTS": "triton"})):
    for _tune in SWEEP:
        _name = f"{_scheme}-sweep-" + "-".join(f"{k}{v}" for k, v in _tune.items())
        VARIANTS[_name] = (_scheme, {**_env, "DIFFGEN_MOE_TUNE": json.dumps(_tune)}, "auto")
DEFAULT_VARIANTS = tuple(name for name in VARIANTS if "-sweep-" not in name)
# Old scheme names (bench/gpu_check.py passes them): the variant each one means today.
SCHEMES = {"bf16": "bf16-torch", "fp8": "fp8-tuned-fused", "fp8-wo": "fp8-tuned-fused", "int8": "int8-tuned-fused",
           "nf4": "nf4-tuned-fused", "int8-torch": "int8-torch", "fp8-scaled": "fp8-scaled"}


def bf16_experts(experts: int, hidden: int, inter: int, dtype: Any, device: Any, seed: int = 0) -> Any:
    """transformers' DiffusionGemma experts module, random weights, diffgen's experts forward
    (transformers' grouped_mm or diffgen's Triton kernel, per ``DIFFGEN_BF16_EXPERTS``)."""
    import torch
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    from diffgen.kernels.bf16_experts import register_experts_implementation

    config = SimpleNamespace(num_experts=experts, hidden_size=hidden, moe_intermediate_size=inter,
                             hidden_activation="gelu_pytorch_tanh",
                             _experts_implementation=register_experts_implementation())
    module = DiffusionGemmaTextExperts(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        module.gate_up_proj = torch.nn.Parameter(
            torch.randn(experts, 2 * inter, hidden, device=device, generator=generator, dtype=dtype) / hidden ** 0.5)
        module.down_proj = torch.nn.Parameter(
            torch.randn(experts, hidden, inter, device=device, generator=generator, dtype=dtype) / inter ** 0.5)
    return module


def quantised_experts(original: Any, scheme: str, dtype: Any, device: Any) -> Any:
    from diffgen.loading.quant import QuantizedExperts

    module = QuantizedExperts(original, scheme, dtype, device)
    module.store("gate_up_proj", original.gate_up_proj.data)
    module.store("down_proj", original.down_proj.data)
    return module


def routing(tokens: int, top_k: int, experts: int, hidden: int, dtype: Any, device: Any, seed: int = 1):
    """Router-like inputs: softmax over random logits, top-k, renormalised (loads uneven by chance)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(tokens, experts, device=device, generator=generator)
    weights, index = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)
    hidden_states = torch.randn(tokens, hidden, device=device, generator=generator).to(dtype)
    return hidden_states, index, weights / weights.sum(dim=-1, keepdim=True)


def reference(weights: Callable[[int], tuple[Any, Any]], act_fn: Any, experts: int, hidden_states: Any,
              top_k_index: Any, top_k_weights: Any) -> Any:
    """Per-expert products in fp32 from ``weights(e) -> (gate_up, down)``."""
    import torch

    final = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for expert in range(experts):
        token, slot = torch.where(top_k_index == expert)
        if token.numel() == 0:
            continue
        gate_up, down = weights(expert)
        gate, up = (hidden_states[token].float() @ gate_up.float().T).chunk(2, dim=-1)
        out = (act_fn(gate) * up) @ down.float().T
        final.index_add_(0, token, out * top_k_weights[token, slot, None].float())
    return final


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], device: Any, reps: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[], Any], reps: int) -> tuple[Optional[float], str]:
    """Median replay time of a CUDA graph of ``fn`` (None and the reason if capture fails)."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # noqa: BLE001 - report, keep measuring the other variants
        torch.cuda.synchronize()
        return None, f"capture failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return median_ms(graph.replay, "cuda", reps, warmup=2), "captured"


def sync_free(fn: Callable[[], Any]) -> str:
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "yes"
    except RuntimeError as error:
        return f"no ({str(error).splitlines()[0][:80]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def weight_bytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class _Env:
    """The variant's environment (read by diffgen at call time), restored afterwards."""

    def __init__(self, values: dict[str, str]):
        self.values = values

    def __enter__(self):
        self.saved = {name: os.environ.get(name) for name in ENV}
        for name in ENV:
            os.environ.pop(name, None)
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run(device: Any = "cuda", tiny: Any = False, variants: Any = None, *, dtype: Any = None, reps: Optional[int] = None,
        **sizes: Any) -> list[dict]:
    """Time one layer's experts forward per variant; one dict per variant.

    ``tiny``: a small layer (``TINY``; on the CPU under the Triton interpreter, so the GPU's code
    paths run in seconds). ``variants``: names in :data:`VARIANTS` (or old scheme names, see
    :data:`SCHEMES`), default :data:`DEFAULT_VARIANTS` (all but the sweep; ``"sweep"`` adds it).
    ``sizes``: tokens / top_k / experts / hidden / inter overrides.
    For bench/gpu_check.py, ``run(device, dtype, schemes, ...)`` (a dtype in ``tiny``'s place)
    still works. Keys: ``variant``, ``scheme``, ``env``, ``path`` (kernels launched per call),
    ``first_ms``, ``eager_ms``, ``graph_ms``, ``graph``, ``sync_free``, ``weight_mb``, ``gb_s``,
    ``rel_error``, the shape, device and versions.
    """
    if not isinstance(tiny, bool):  # the old positional form: run(device, dtype, schemes, ...)
        dtype, tiny = tiny, False
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    if device.type == "cpu" and tiny and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton paths, interpreted
    from diffgen.kernels import capability, launches

    shape = {**(TINY if tiny else REAL), **sizes}
    dtype = dtype or (torch.bfloat16 if cuda or tiny else torch.float32)
    reps = reps or (20 if cuda else 1)
    warmup = 3 if cuda else 0
    names = []
    for name in (variants or DEFAULT_VARIANTS):
        names += [v for v in VARIANTS if "-sweep-" in v] if name == "sweep" else [SCHEMES.get(name, name)]
    names = list(dict.fromkeys(names))
    tokens, top_k, experts, hidden, inter = (shape[key] for key in ("tokens", "top_k", "experts", "hidden", "inter"))
    torch.manual_seed(0)
    original = bf16_experts(experts, hidden, inter, dtype, device)
    inputs = routing(tokens, top_k, experts, hidden, dtype, device)
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
            **shape, "torch": torch.__version__, "interpreted": os.environ.get("TRITON_INTERPRET") == "1"}
    if cuda:
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        meta["torch_grouped_mm_fast"] = capability.torch_grouped_mm_is_fast(device, dtype)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    import transformers

    meta["transformers"] = transformers.__version__
    rows: list[dict] = []
    built: dict[str, Any] = {}
    refs: dict[str, Any] = {}
    with torch.no_grad():
        refs["bf16"] = reference(lambda e: (original.gate_up_proj[e], original.down_proj[e]), original.act_fn, experts,
                                 *inputs)
        for name in names:
            scheme, env, backend = VARIANTS[name]
            if scheme == "bf16":
                module = original
            else:
                if scheme not in built:
                    built[scheme] = quantised_experts(original, scheme, dtype, device)
                    quantised = built[scheme]
                    refs[scheme] = reference(lambda e, m=quantised: (m.gate_up_proj.weight(e), m.down_proj.weight(e)),
                                             quantised.act_fn, experts, *inputs)
                module = built[scheme]
                for stack in (module.gate_up_proj, module.down_proj):
                    stack.backend, stack.fp8_activations = backend, None
            call = lambda m=module: m(*inputs)  # noqa: E731
            row = {**meta, "variant": name, "scheme": scheme, "env": env, "backend": backend}
            try:
                with _Env(env):
                    before, before_torch = dict(launches.COUNTS), dict(launches.GROUPED_PATHS)
                    _sync(device)
                    begin = time.perf_counter()
                    out = call()
                    _sync(device)
                    row["first_ms"] = (time.perf_counter() - begin) * 1e3
                    ran = {k: v - before.get(k, 0) for k, v in launches.COUNTS.items() if v != before.get(k, 0)}
                    for key in ("torch", "fp8_scaled"):
                        if launches.GROUPED_PATHS[key] != before_torch.get(key, 0):
                            ran[key] = launches.GROUPED_PATHS[key] - before_torch.get(key, 0)
                    row["path"] = "+".join(f"{k}x{v}" for k, v in sorted(ran.items())) or "transformers grouped_mm"
                    ref = refs[scheme]
                    row["rel_error"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    row["eager_ms"] = median_ms(call, device, reps, warmup)
                    row["graph_ms"], row["graph"], row["sync_free"] = None, "n/a (cpu)", "n/a (cpu)"
                    if cuda:
                        row["sync_free"] = sync_free(call)
                        row["graph_ms"], row["graph"] = graph_ms(call, reps)
            except Exception as error:  # noqa: BLE001 - one variant failing must not lose the others
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                _sync(device)
            row["weight_mb"] = weight_bytes(module) / 1e6
            if row.get("eager_ms"):
                row["gb_s"] = row["weight_mb"] / 1e3 / ((row["graph_ms"] or row["eager_ms"]) / 1e3)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--variants", nargs="+", help=f"default: {', '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--sweep", action="store_true", help="also the tuned kernel with tile overrides (fp8, bf16)")
    parser.add_argument("--tiny", action="store_true", help="tiny layer; on the CPU under the Triton interpreter")
    parser.add_argument("--small", action="store_true", help="alias of --tiny")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--inter", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--reps", type=int)
    args = parser.parse_args()
    tiny = args.tiny or args.small
    if args.device == "cpu" and tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    sizes = {key: getattr(args, key) for key in ("tokens", "experts", "hidden", "inter", "top_k")
             if getattr(args, key) is not None}
    variants = list(args.variants or DEFAULT_VARIANTS) + (["sweep"] if args.sweep else [])
    rows = run(args.device, tiny, variants, dtype=getattr(torch, args.dtype) if args.dtype else None,
               reps=args.reps, **sizes)
    for row in rows:
        print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
