"""The whole GPU check of the speed issue in one process; prints its table last.

One random model of the released model's dimensions is built once per weight scheme (random
bf16 tensors generated on the device and streamed through diffgen's loader, so quantised
experts never sit on the GPU in bf16), and everything is measured on it side by side:

* the weight-read floor: device-to-device copy bandwidth and the bytes one step reads;
* diffgen's fast step replayed from CUDA graphs, the same step eager, and transformers'
  ``generate()`` (eager; compiled with a static cache with ``--compiled-reference``, which
  costs minutes of compilation and runs last);
* batch 8 against batch 1 (bf16, never re-planned to another scheme);
* fp8, int8 and nf4 experts;
* the kernels alone: the fused sampler tail and the grouped expert GEMMs, when present.

Needs torch, transformers and (on CUDA) triton only: no typer, rich or bitsandbytes. Rows are
printed to stderr as they finish, the table to stdout at the end, and JSON to ``--out``.

    python bench/gpu_check.py                                   # on the GPU machine
    python bench/gpu_check.py --config tiny --device cpu        # dry run on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # diffgen/ and devtools/ without installing


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def copy_bandwidth(device) -> float:
    """Bytes per second a device-to-device copy moves (read + write), median of 10."""
    import statistics

    import torch

    n = (2 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    del src, dst
    return 2 * n / statistics.median(times)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bytes(model) -> int:
    """Bytes of weights one denoising step reads: every unique tensor of the decoder (the
    encoder shares them) including the tied embedding / lm_head, not the vision tower."""
    seen, total = set(), 0
    for tensor in [*model.model.decoder.parameters(), *model.model.decoder.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def tiny_config_path(tmp: Path) -> str:
    from devtools.tiny import tiny_config

    path = tmp / "tiny-config.json"
    path.write_text(tiny_config().to_json_string())
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="real", help="real, tiny, or a config.json path")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--schemes", nargs="*", default=["fp8", "nf4", "int8"], help="quantised schemes after bf16")
    parser.add_argument("--compiled-reference", action="store_true", help="also time generate() compiled (slow)")
    parser.add_argument("--kernels", action="store_true", default=True)
    parser.add_argument("--no-kernels", dest="kernels", action="store_false")
    parser.add_argument("--first-call", action="store_true", default=True,
                        help="time a fresh process's first generation with a cold and a warm Triton cache")
    parser.add_argument("--no-first-call", dest="first_call", action="store_false")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    import tempfile

    import torch
    import transformers

    from diffgen.denoise import bench
    from diffgen.planning.plan import LoadPlan

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config_path(Path(tempfile.mkdtemp())) if args.config == "tiny" else args.config
    dtype = "bfloat16" if cuda else "float32"
    # A cold kernel cache for this process, so the first call's cost is what a new install pays.
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cold-"))
    header = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "driver": _driver() if cuda else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": _version("triton"), "config": args.config, "steps": args.steps, "canvases": args.canvases,
        "prompt_tokens": args.prompt_tokens,
    }
    log(f"{header}")
    rows: list[dict] = []
    results: dict = {"header": header, "rows": rows}

    def save() -> None:
        (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))

    def measure(label: str, loaded, **kw) -> dict | None:
        log(f"measuring {label} ...")
        try:
            result = bench.run(loaded, steps=args.steps, prompt_tokens=args.prompt_tokens, canvases=args.canvases,
                               reps=args.reps, **kw)
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            rows.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
            save()
            return None
        kind = "graphs" if result["graphs"] and not result["graph_failure"] else "eager"
        result["label"] = label = f"{label} ({result['sampler']}, {kind})"
        rows.append(result)
        log(f"{label}: median step {result['median_step_ms']:.2f} ms, e2e/step {result['e2e_step_ms']:.2f} ms, "
            f"first call {result['first_call_s']:.2f} s, {result['tokens_per_s_e2e']:.0f} tok/s"
            + (f", reference {result['reference_e2e_step_ms']:.2f} ms" if "reference_e2e_step_ms" in result else ""))
        save()
        return result

    results["copy_bytes_per_s"] = copy_bandwidth(device)
    log(f"copy bandwidth {results['copy_bytes_per_s'] / 1e9:.0f} GB/s")

    start = time.perf_counter()
    loaded = bench.random_model(config, LoadPlan(str(device), dtype))
    results["build_bf16_s"] = time.perf_counter() - start
    results["step_bytes_bf16"] = step_bytes(loaded.model)
    results["floor_ms_bf16"] = results["step_bytes_bf16"] / results["copy_bytes_per_s"] * 1e3
    log(f"built bf16 model in {results['build_bf16_s']:.1f} s; a step reads {results['step_bytes_bf16'] / 1e9:.1f} GB "
        f"-> floor {results['floor_ms_bf16']:.2f} ms")
    save()

    measure("bf16 b1", loaded, exact=False, compare_reference=True)
    measure("bf16 b1", loaded, exact=False, graphs=False)
    measure(f"bf16 b{args.batch}", loaded, exact=False, batch=args.batch)
    if args.kernels:
        _kernels(results, device, save)
    compiled_pending = args.compiled_reference
    del loaded
    _free(device)

    for scheme in args.schemes:
        if scheme == "fp8" and not (cuda and torch.cuda.get_device_capability(device) >= (8, 9)):
            continue
        try:
            start = time.perf_counter()
            loaded = bench.random_model(config, LoadPlan(str(device), dtype, scheme))
            results[f"build_{scheme}_s"] = time.perf_counter() - start
            results[f"step_bytes_{scheme}"] = step_bytes(loaded.model)
            results[f"floor_ms_{scheme}"] = results[f"step_bytes_{scheme}"] / results["copy_bytes_per_s"] * 1e3
            log(f"built {scheme} model in {results[f'build_{scheme}_s']:.1f} s; floor {results[f'floor_ms_{scheme}']:.2f} ms")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"label": f"{scheme} build", "error": f"{type(exc).__name__}: {exc}"})
            continue
        measure(f"{scheme} b1", loaded, exact=False)
        del loaded
        _free(device)

    if args.first_call:
        _first_calls(results, args.device, save)

    if compiled_pending:
        print(table(results), flush=True)  # the main table, in case the compile outlives the call
        loaded = bench.random_model(config, LoadPlan(str(device), dtype))
        measure("bf16 b1 vs compiled", loaded, exact=False, compare_reference=True,
                reference_cache="static")
    save()
    print(table(results), flush=True)
    return 0


def _first_calls(results: dict, device: str, save) -> None:
    """A second CLI call's first generation: new processes sharing one Triton cache directory."""
    import subprocess
    import tempfile

    cache = tempfile.mkdtemp(prefix="triton-cache-")
    env = {**os.environ, "TRITON_CACHE_DIR": cache}
    calls = []
    for scheme in ("none", "nf4"):
        for which in ("cold", "warm"):
            log(f"first call in a new process, {scheme}, {which} Triton cache ...")
            done = subprocess.run([sys.executable, str(ROOT / "bench" / "first_call.py"), "--device", device,
                                   "--scheme", scheme], capture_output=True, text=True, env=env)
            try:
                calls.append({"cache": which, **json.loads(done.stdout.strip().splitlines()[-1])})
            except (IndexError, ValueError):
                calls.append({"cache": which, "scheme": scheme, "error": done.stderr[-600:]})
            log(f"{calls[-1]}")
    results["first_calls"] = calls
    save()


def _kernels(results: dict, device, save) -> None:
    for name, call in (("sampler_tail", _sampler_tail), ("moe_grouped", _moe_grouped)):
        try:
            results[name] = call(device)
            log(f"{name}: {results[name]}")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            results[name] = f"error: {type(exc).__name__}: {exc}"
        save()


def _sampler_tail(device):
    sys.path.insert(0, str(ROOT / "bench"))
    import sampler_tail

    if device.type == "cuda":
        return sampler_tail.run(str(device), [1, 8], 262144, 256, paths=("triton", "fast_sampler"))
    return sampler_tail.run(str(device), [1], 4096, 16, reps=2)


def _moe_grouped(device):
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import moe_grouped

    if device.type == "cuda":
        return moe_grouped.run(str(device), torch.bfloat16, ("bf16", "fp8", "fp8-wo", "int8", "nf4"))
    return moe_grouped.run(str(device), torch.float32, tokens=32, experts=8, hidden=128, inter=64, reps=2)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _driver() -> str | None:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def table(results: dict) -> str:
    h = results["header"]
    floor = results.get("floor_ms_bf16")
    lines = [
        f"{h['device']}, driver {h['driver']}; torch {h['torch']}, transformers {h['transformers']}, "
        f"triton {h['triton']}; {h['config']} dimensions, random weights; {h['prompt_tokens']}-token prompt, "
        f"{h['canvases']} canvases x {h['steps']} fixed steps; medians after a warm-up call",
        f"copy bandwidth {results['copy_bytes_per_s'] / 1e9:.0f} GB/s; bf16 step reads "
        f"{results['step_bytes_bf16'] / 1e9:.1f} GB -> floor {floor:.2f} ms",
        "",
        f"{'run':<34}{'ms/step':>9}{'e2e ms/step':>12}{'x floor':>8}{'tok/s':>8}{'first s':>8}{'ref ms':>8}{'speedup':>8}",
    ]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"{row['label']:<34}  {row['error'][:90]}")
            continue
        scheme = row["scheme"] if row["scheme"] != "none" else "bf16"
        row_floor = results.get(f"floor_ms_{scheme}", floor)
        ref = row.get("reference_e2e_step_ms")
        lines.append(
            f"{row['label']:<34}{row['median_step_ms']:>9.2f}{row['e2e_step_ms']:>12.2f}"
            f"{row['median_step_ms'] / row_floor:>8.2f}{row['tokens_per_s_e2e']:>8.0f}{row['first_call_s']:>8.1f}"
            + (f"{ref:>8.2f}{ref / row['e2e_step_ms']:>8.2f}" if ref else ""))
    for call in results.get("first_calls", []):
        if "error" in call:
            lines.append(f"first call, new process, {call['scheme']}, {call['cache']} Triton cache: {call['error'][-200:]}")
        else:
            lines.append(f"first call, new process, 2-layer model, {call['scheme']}, {call['cache']} Triton cache: "
                         f"{call['first_call_s']:.2f} s (second call {call['second_call_s']:.2f} s)")
    for key in ("sampler_tail", "moe_grouped"):
        if key in results:
            lines += ["", f"{key}:", json.dumps(results[key], default=str)[:1500]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
