"""One MoE layer's experts forward per scheme: time, weight-read bandwidth, error, graph capture.

Schemes (one random layer, the same routing for all):

* ``bf16`` — transformers' own ``grouped_mm`` experts (the unquantised baseline);
* ``fp8`` — diffgen's default for fp8: ``torch._scaled_grouped_mm`` (fp8 x fp8, activations
  quantised per row) where the card has it, else the weight-only kernel; ``fp8-wo`` forces the
  weight-only path (the Triton kernel where it runs);
* ``int8``, ``nf4`` — diffgen's weight-only Triton kernel (torch fallback where it cannot run);
* ``<s>-torch`` — dequantise all experts, then torch's grouped matmul (the torch fallback; also
  what torchao 0.18 does for weight-only formats in grouped products);
* ``<s>-loop`` — the per-expert Python loop diffgen used before (host syncs, not capturable).

No library candidate runs here: as of 2026-11 no well-kept library ships a grouped weight-only
int8/nf4/int4 GEMM (bitsandbytes 0.50.2 loops over experts, its grouped work is an open pull
request; gemlite 0.6.0.post2 has dense kernels only; torchao 0.18.0's grouped kernels are
fp8/mxfp8/nvfp4 and it dequantises weight-only formats before a bf16 grouped matmul — the
``-torch`` rows measure that approach).

Per scheme: the median of ``reps`` eager calls after warm-up (synchronised; CUDA events on a
GPU), the first call (Triton compiles there), the median replay of a CUDA graph of the call
(captured only if the call makes no host sync; a capture failure is reported), whether the call
passes ``torch.cuda.set_sync_debug_mode("error")``, achieved GB/s of weight reads (bytes of the
stored weights and scales over the graph time, else the eager time), and the error relative
to the dequantised reference (per-expert products in fp32). ``sweep=True`` also times a few
Triton tile configurations per projection.

Imports only torch, triton, transformers and diffgen's loading.quant / kernels, so it runs on
a GPU machine without typer or rich:

    python bench/moe_grouped.py                               # cuda, bf16, real layer
    python bench/moe_grouped.py --device cpu --small          # CPU dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMES = ("bf16", "fp8", "fp8-wo", "int8", "nf4", "int8-torch", "nf4-torch", "int8-loop", "nf4-loop")
SWEEP = (  # alternatives to moe.kernel_config's defaults (LUT applies to nf4 only)
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16},
    {"LUT": 0},
)


def bf16_experts(experts: int, hidden: int, inter: int, dtype: Any, device: Any, seed: int = 0) -> Any:
    """transformers' Gemma 4 experts module (DiffusionGemma's), random weights, ``grouped_mm`` forward."""
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    config = SimpleNamespace(num_experts=experts, hidden_size=hidden, moe_intermediate_size=inter,
                             hidden_activation="gelu_pytorch_tanh", _experts_implementation="grouped_mm")
    module = Gemma4TextExperts(config)
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


def looped_forward(module: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
    """diffgen's experts forward before grouping: dequantise and run one expert at a time."""
    import torch

    final = torch.zeros_like(hidden_states)
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=module.num_experts).permute(2, 1, 0)
    for expert in mask.sum(dim=(-1, -2)).nonzero().flatten().tolist():
        slot, token = torch.where(mask[expert])
        gate, up = torch.nn.functional.linear(hidden_states[token], module.gate_up_proj.weight(expert)).chunk(2, -1)
        out = torch.nn.functional.linear(module.act_fn(gate) * up, module.down_proj.weight(expert))
        final.index_add_(0, token, (out * top_k_weights[token, slot, None]).to(final.dtype))
    return final


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
    except Exception as error:  # noqa: BLE001 - report, keep measuring the other schemes
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


def run(device: Any = "cuda", dtype: Any = None, schemes: Any = SCHEMES, tokens: int = 256, top_k: int = 8,
        experts: int = 128, hidden: int = 2816, inter: int = 704, reps: int = 20, sweep: bool = False) -> list[dict]:
    """Time one layer's experts forward per scheme; one dict per scheme (and per sweep point).

    Keys: ``scheme``, ``path`` (the kernels that ran), ``first_ms``, ``eager_ms``, ``graph_ms``,
    ``graph`` (captured / why not), ``sync_free``, ``weight_mb``, ``gb_s``, ``rel_error``, the
    shape, device and versions. ``dtype`` defaults to bf16 on CUDA, fp32 elsewhere.
    """
    import torch

    from diffgen.kernels import moe

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    torch.manual_seed(0)
    original = bf16_experts(experts, hidden, inter, dtype, device)
    inputs = routing(tokens, top_k, experts, hidden, dtype, device)
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
            "tokens": tokens, "top_k": top_k, "experts": experts, "hidden": hidden, "inter": inter,
            "torch": torch.__version__}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    import transformers

    meta["transformers"] = transformers.__version__
    rows: list[dict] = []
    built: dict[str, Any] = {}
    with torch.no_grad():
        bf16_ref = reference(lambda e: (original.gate_up_proj[e], original.down_proj[e]), original.act_fn, experts,
                             *inputs)
        for scheme in schemes:
            base, _, variant = scheme.partition("-")
            if base == "bf16":
                module, ref = original, bf16_ref
                call = lambda m=original: m(*inputs)  # noqa: E731
            else:
                if base not in built:
                    built[base] = quantised_experts(original, base, dtype, device)
                module = built[base]
                for stack in (module.gate_up_proj, module.down_proj):
                    stack.backend = "torch" if variant == "torch" else "auto"
                    stack.fp8_activations = variant != "wo"
                ref = reference(lambda e, m=module: (m.gate_up_proj.weight(e), m.down_proj.weight(e)), module.act_fn,
                                experts, *inputs)
                call = (lambda m=module: looped_forward(m, *inputs)) if variant == "loop" else \
                    (lambda m=module: m(*inputs))  # noqa: E731
            before = dict(moe.LAUNCHES)
            _sync(device)
            begin = time.perf_counter()
            out = call()
            _sync(device)
            first = (time.perf_counter() - begin) * 1e3
            ran = {key: moe.LAUNCHES[key] - before.get(key, 0) for key in moe.LAUNCHES if moe.LAUNCHES[key] != before.get(key, 0)}
            path = "per-expert loop" if variant == "loop" else "transformers grouped_mm" if base == "bf16" else \
                "+".join(f"{key}x{count}" for key, count in sorted(ran.items()))
            error = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            eager = median_ms(call, device, reps)
            graph, captured, synced = None, "n/a (cpu)", "n/a (cpu)"
            if cuda:
                synced = sync_free(call)
                graph, captured = graph_ms(call, reps) if variant != "loop" else (None, "skipped (syncs)")
            mb = weight_bytes(module) / 1e6
            rows.append({**meta, "scheme": scheme, "path": path, "first_ms": first, "eager_ms": eager,
                         "graph_ms": graph, "graph": captured, "sync_free": synced, "weight_mb": mb,
                         "gb_s": mb / 1e3 / ((graph or eager) / 1e3), "rel_error": error})
        if sweep and cuda:
            rows += _sweep(built, inputs, meta, reps)
    return rows


def _sweep(built: dict, inputs: tuple, meta: dict, reps: int) -> list[dict]:
    """Time the Triton kernel alone per projection for a few tile configurations."""
    import torch

    from diffgen.kernels import moe

    hidden_states, index, _ = inputs
    perm, ends = moe.route(index, next(iter(built.values())).num_experts)
    rows = []
    for scheme, module in built.items():
        x = hidden_states[perm // index.shape[-1]].contiguous()
        h = torch.empty(x.shape[0], module.down_proj.shape[1], device=x.device, dtype=x.dtype).normal_()
        for name, stack, a in (("gate_up", module.gate_up_proj, x), ("down", module.down_proj, h)):
            n, k = stack.shape
            default = moe.kernel_config(a.shape[0], ends.numel(), n, k, scheme)
            for config in (default, *(c for c in SWEEP if scheme == "nf4" or "LUT" not in c)):
                fn = lambda c=config: moe.grouped_mm_triton(a, stack.q, stack.scale, stack.code, ends, scheme, n, k,  # noqa: E731
                                                            config=c)
                try:
                    ms = median_ms(fn, "cuda", reps)
                except Exception as error:  # noqa: BLE001 - a config that does not compile/fit
                    rows.append({**meta, "scheme": f"{scheme}/{name}", "config": config, "error": str(error)[:120]})
                    continue
                mb = sum(t.numel() * t.element_size() for t in (stack.q, stack.scale)) / 1e6
                rows.append({**meta, "scheme": f"{scheme}/{name}", "config": config, "eager_ms": ms,
                             "gb_s": mb / 1e3 / (ms / 1e3), "default": config is default})
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'scheme':<12} {'path':<26} {'first ms':>9} {'eager ms':>9} {'graph ms':>9} {'GB/s':>7} {'rel err':>8}  sync-free / graph"
    lines = [head, "-" * len(head)]
    for row in rows:
        if "config" in row:
            continue
        graph = f"{row['graph_ms']:9.3f}" if row["graph_ms"] is not None else f"{'-':>9}"
        lines.append(f"{row['scheme']:<12} {row['path'][:26]:<26} {row['first_ms']:9.1f} {row['eager_ms']:9.3f} "
                     f"{graph} {row['gb_s']:7.1f} {row['rel_error']:8.1e}  {row['sync_free']} / {row['graph']}")
    sweep = [row for row in rows if "config" in row]
    if sweep:
        lines += ["", "Triton tile sweep (kernel alone, eager median):"]
        for row in sweep:
            config = " ".join(f"{key}={value}" for key, value in row["config"].items())
            timing = f"{row['eager_ms']:8.3f} ms {row['gb_s']:6.0f} GB/s" if "eager_ms" in row else row["error"]
            lines.append(f"  {row['scheme']:<14} {timing}  {config}{'  (default)' if row.get('default') else ''}")
    if rows:
        first = rows[0]
        lines.append(f"\n{first['device']}, {first['dtype']}, {first['tokens']} tokens x top-{first['top_k']} over "
                     f"{first['experts']} experts, hidden {first['hidden']}, inter {first['inter']}; torch "
                     f"{first['torch']}, triton {first['triton']}, transformers {first['transformers']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--small", action="store_true", help="small layer (CPU dry run): 64 tokens, 16 experts, 256/64")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--inter", type=int)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()

    import torch

    sizes = {"tokens": 64, "experts": 16, "hidden": 256, "inter": 64} if args.small else {}
    for key in ("tokens", "experts", "hidden", "inter"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    rows = run(args.device, getattr(torch, args.dtype) if args.dtype else None, args.schemes, top_k=args.top_k,
               reps=args.reps, sweep=args.sweep, **sizes)
    print(table(rows))


if __name__ == "__main__":
    main()
