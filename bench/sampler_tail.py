"""Time the sampler tail at the real logits shape: fused Triton kernel vs torch backend vs today's path.

Three ways to go from raw lm_head logits ``[B, C, V]`` (bf16) to (sampled, argmax, entropy) plus
the next step's bf16 self-conditioning logits:

* ``triton``: ``sample_tail(..., backend="triton")``, one kernel reading the logits once;
* ``torch``: ``sample_tail(..., backend="torch")``, the reference formulas in chunked passes;
* ``fast_sampler``: what the loop does today with ``FastSampler`` — soft-cap in float32 (the
  model's forward), divide by the temperature, ``fused_entropy`` (logsumexp, exp, sum), argmax,
  ``torch.rand`` Gumbel noise and ``argmax(scaled + G)``, and the bf16 self-conditioning cast —
  copied here operation for operation so this script needs nothing but torch (and triton).

Each timing is the median of ``--reps`` runs after ``--warmup`` runs, synchronising the device
around every run. On a GPU the triton rows also report how often the kernel's tokens agree with
the torch backend's on the same inputs (they differ only at float near-ties).

    python bench/sampler_tail.py                             # CUDA: B=1 and B=8, C=256, V=262144
    python bench/sampler_tail.py --device cpu --vocab 4096   # a dry run on the CPU

Imports only torch, triton and diffgen.kernels (the GPU machine has no typer/rich); ``run()`` is
the entry point for a combined GPU check script.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # diffgen/ beside bench/

SOFTCAP = 30.0
TEMPERATURE = 0.6


def _fast_sampler_path(raw, temperature, generator):
    """Today's loop with FastSampler (diffgen.denoise.sampling), from raw logits."""
    import torch

    logits = torch.tanh(raw.float() / SOFTCAP) * SOFTCAP  # the model's forward soft-caps in fp32
    scaled = logits / temperature
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)  # fused_entropy
    probs = torch.exp(scaled - log_z)
    entropy = log_z.squeeze(-1) - (probs * scaled).sum(dim=-1)
    uniform = torch.rand(scaled.shape, generator=generator, device=scaled.device)  # gumbel_noise
    sampled = torch.argmax(scaled + -torch.log(-torch.log(uniform)), dim=-1)  # gumbel_argmax
    argmax = torch.argmax(scaled, dim=-1)
    self_conditioning = scaled.to(torch.bfloat16)
    return sampled, argmax, entropy, self_conditioning


def _time(fn, device, warmup: int, reps: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU milliseconds of each timed run."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, cpu_times = [], []
    for _ in range(reps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        cpu_times.append((time.process_time() - cpu_start) * 1e3)
    return times, cpu_times


def run(device: str = "cuda", batch_sizes=(1, 8), vocab: int = 262_144, canvas: int = 256, *,
        warmup: int = 3, reps: int = 20, paths=("triton", "torch", "fast_sampler"), seed: int = 0) -> list[dict]:
    """Time each path at each batch size; one dict per (path, batch).

    Keys: ``path``, ``batch``, ``canvas``, ``vocab``, ``device`` (name), ``median_ms``, ``min_ms``
    (milliseconds per call), ``gbps`` (logits read + bf16 self-conditioning written, GB/s at the
    median), on the CPU ``cpu_median_ms`` (the process's CPU time per call), and for ``triton`` on CUDA ``sampled_agree`` / ``argmax_agree`` (fraction of positions
    where the kernel's tokens equal the torch backend's) and ``entropy_max_abs`` (nats); ``skipped``
    with a reason instead of timings where a path cannot run (triton off CUDA).
    """
    import torch

    from diffgen.kernels import noise
    from diffgen.kernels.fused import triton_available
    from diffgen.kernels.sampler import sample_tail

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    rows = []
    for batch in batch_sizes:
        generator = torch.Generator(device=dev).manual_seed(seed)
        # Logits shaped like a language model's: mostly flat noise with a few strong candidates.
        raw = torch.randn((batch, canvas, vocab), generator=generator, device=dev, dtype=torch.float32)
        raw.mul_(2.0)
        raw[..., :64] += 8.0
        raw = raw.to(torch.bfloat16)
        temperature = torch.full((batch,), TEMPERATURE, device=dev)
        keys = noise.step_keys(torch.arange(batch, device=dev), 0, 1, noise.STREAM_GUMBEL)
        out = torch.empty_like(raw)
        moved = raw.numel() * raw.element_size() + out.numel() * out.element_size()
        calls = {
            "triton": lambda: sample_tail(raw, softcap=SOFTCAP, temperature=temperature, keys=keys,
                                          self_conditioning_out=out, backend="triton"),
            "torch": lambda: sample_tail(raw, softcap=SOFTCAP, temperature=temperature, keys=keys,
                                         self_conditioning_out=out, backend="torch"),
            "fast_sampler": lambda: _fast_sampler_path(raw, temperature[:, None, None], generator),
        }
        for path in paths:
            row = dict(path=path, batch=batch, canvas=canvas, vocab=vocab, device=name)
            if path == "triton" and (dev.type != "cuda" or not triton_available()):
                rows.append(dict(row, skipped="the triton backend needs CUDA and triton"))
                continue
            try:
                times, cpu_times = _time(calls[path], dev, warmup, reps)
            except torch.OutOfMemoryError as error:
                rows.append(dict(row, skipped=f"out of memory: {str(error).splitlines()[0]}"))
                torch.cuda.empty_cache()
                continue
            median = statistics.median(times)
            row.update(median_ms=median, min_ms=min(times), gbps=moved / median / 1e6)
            if dev.type == "cpu":  # on a shared machine, the process's own CPU time is the steadier number
                row.update(cpu_median_ms=statistics.median(cpu_times))
            if path == "triton":
                fused = calls["triton"]()
                sc_fused = out.clone()
                reference = calls["torch"]()
                row.update(sampled_agree=float((fused[0] == reference[0]).float().mean()),
                           argmax_agree=float((fused[1] == reference[1]).float().mean()),
                           entropy_max_abs=float((fused[2] - reference[2]).abs().max()),
                           sc_max_abs=float((sc_fused.float() - out.float()).abs().max()))
            rows.append(row)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        del raw, out
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`run`'s rows."""
    lines = [f"{'path':<13} {'B':>2} {'C':>4} {'V':>7} {'median ms':>10} {'min ms':>8} {'GB/s':>7}  notes"]
    for row in rows:
        head = f"{row['path']:<13} {row['batch']:>2} {row['canvas']:>4} {row['vocab']:>7}"
        if "skipped" in row:
            lines.append(f"{head}  skipped: {row['skipped']}")
            continue
        agree = f"process CPU {row['cpu_median_ms']:.1f} ms" if "cpu_median_ms" in row else ""
        if "sampled_agree" in row:
            agree = (f"sampled {row['sampled_agree']:.4f} argmax {row['argmax_agree']:.4f} "
                     f"|dH| {row['entropy_max_abs']:.1e} |dSC| {row['sc_max_abs']:.1e}")
        lines.append(f"{head} {row['median_ms']:>10.3f} {row['min_ms']:>8.3f} {row['gbps']:>7.1f}  {agree}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--paths", nargs="+", default=["triton", "torch", "fast_sampler"])
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.device, args.batch, args.vocab, args.canvas, warmup=args.warmup, reps=args.reps,
               paths=tuple(args.paths))
    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        versions += ", no triton"
    device = rows[0]["device"] if rows else args.device
    print(f"sampler tail, {device}, {versions}, bf16 logits, softcap {SOFTCAP}, T {TEMPERATURE}, "
          f"median of {args.reps} after {args.warmup} warm-up, threads {torch.get_num_threads()}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
