"""`diffgen serve` under concurrent clients: continuous batching against one request at a time.

Builds a small random checkpoint (devtools/tiny.py; big enough that the decoder forward, not
HTTP, dominates a request), starts `diffgen serve` on it twice -- `--max-batch 16` (batched)
and `--max-batch 1` (sequential), both resident, used in turn (interleaved per client count, so
load from elsewhere on the machine hits both alike) -- and for 1, 4 and 16 concurrent clients sends
requests (each client sends its next request when its last one is answered; fixed steps,
adaptive stopping off, a seed per request) and prints requests/s and p50/p99 latency as one
table, plus the decoder forward passes each mode ran (from /metrics).

    python bench/serve_concurrency.py [--requests-per-client 2] [--steps 8] [--max-tokens 64]

Torch runs one thread in the server (OMP_NUM_THREADS=1, as in the tests) so the two modes see
the same machine. p99 of a few dozen latencies is close to their maximum.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/

PROMPTS = ["Why is the sky blue?", "Write a haiku about rain.", "Summarise the notes below in three sentences.",
           "def main():", "Once upon a time", "List three prime numbers."]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(checkpoint: Path, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "diffgen", "serve", "-m", str(checkpoint), "--port",
                                    str(port), "--max-batch", str(max_batch), "--max-queue", "256", "-q"],
                                   stdout=subprocess.DEVNULL, stderr=handle, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise SystemExit(f"diffgen serve exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)


def forwards(url: str) -> float:
    import httpx

    from diffgen.server.metrics import parse

    return parse(httpx.get(url + "/metrics").text)["diffgen_decoder_forwards_total"]


def load(url: str, clients: int, per_client: int, body: dict) -> tuple[float, list[float]]:
    """``clients`` threads each sending ``per_client`` requests back to back: (wall seconds, latencies)."""
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client(number: int) -> None:
        with httpx.Client(timeout=None) as http:
            for k in range(per_client):
                index = number * per_client + k
                request = {**body, "prompt": PROMPTS[index % len(PROMPTS)], "seed": index}
                began = time.perf_counter()
                answer = http.post(url + "/v1/completions", json=request)
                took = time.perf_counter() - began
                if answer.status_code != 200:
                    errors.append(answer.text)
                with lock:
                    latencies.append(took)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    return time.perf_counter() - began, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    import torch
    import transformers

    from devtools.tiny import save_tiny_checkpoint

    body = {"max_tokens": args.max_tokens, "steps": args.steps, "stability": 0}
    rows = []
    passes = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_tiny_checkpoint(
            f"{tmp}/m", canvas_length=32, vocab_size=2048, hidden_size=256, intermediate_size=512,
            num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, global_head_dim=64, num_experts=8, moe_intermediate_size=256)
        modes = {"batched (--max-batch 16)": 16, "sequential (--max-batch 1)": 1}
        servers = {}
        try:
            for mode, max_batch in modes.items():
                servers[mode] = start(checkpoint, max_batch, Path(tmp) / f"serve-{max_batch}.log")
            before = {}
            for mode, (_, url) in servers.items():
                load(url, 1, 2, body)  # warm-up
                before[mode] = forwards(url)
            for clients in args.concurrency:
                for mode, (_, url) in servers.items():
                    seconds, latencies = load(url, clients, args.requests_per_client, body)
                    rows.append((mode, clients, len(latencies) / seconds, percentile(latencies, 0.5),
                                 percentile(latencies, 0.99)))
            for mode, (_, url) in servers.items():
                passes[mode] = forwards(url) - before[mode]
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait()
        rows.sort(key=lambda row: (not row[0].startswith("batched"), row[1]))

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; server OMP_NUM_THREADS=1")
    print(f"# random model: hidden 256, 4 layers, 8 experts, vocab 2048, canvas 32; {args.max_tokens} tokens per "
          f"request, {args.steps} fixed steps per canvas; {args.requests_per_client} requests per client")
    print("| mode | clients | requests/s | p50 latency s | p99 latency s |")
    print("|---|---|---|---|---|")
    for mode, clients, rate, p50, p99 in rows:
        print(f"| {mode} | {clients} | {rate:.2f} | {p50:.3f} | {p99:.3f} |")
    for mode, count in passes.items():
        print(f"# decoder forward passes, {mode}: {count:g}")
    speedups = {clients: rate for mode, clients, rate, _, _ in rows if mode.startswith("batched")}
    for mode, clients, rate, _, _ in rows:
        if mode.startswith("sequential"):
            print(f"# {clients} clients: batched / sequential requests/s = {speedups[clients] / rate:.2f}x")


if __name__ == "__main__":
    main()
