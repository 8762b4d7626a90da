"""`run --server` and `batch --server`: the CLI as a client of a real `diffgen serve` (a uvicorn
subprocess on the tiny checkpoint) and of a plain OpenAI-compatible server without diffgen's
extension fields (a small stdlib HTTP server in a thread, standing in for vLLM).

With the exact sampler and a seed, `run --server` prints byte for byte what a local `run --seed`
prints (timing fields aside). A server killed mid-batch, restarted and resumed leaves every id
exactly once; tests wait on the output file's records, never on the clock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import free_port, run_cli, start_server, stop_server

KEY = "k3y"
PROMPT = "Why is the sky blue?"
TIMING = ("seconds", "tokens_per_second")


@pytest.fixture(scope="module")
def exact_server(tiny_checkpoint, tmp_path_factory):
    """`diffgen serve --exact` with an API key, shared by the module."""
    served = start_server(tiny_checkpoint, tmp_path_factory.mktemp("exact") / "stderr.log", "--exact",
                          env={"DIFFGEN_API_KEY": KEY})
    yield served
    stop_server(served)


def remote(*args: str, server, key: str = KEY, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, "--server", server.url, env={"DIFFGEN_API_KEY": key, **(env or {})})


def untimed(record: dict) -> dict:
    return {**record, "stats": {k: v for k, v in record["stats"].items() if k not in TIMING}}


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr.decode()
    return done


# -- run --server against diffgen serve --------------------------------------------------------------------


@pytest.mark.parametrize("flags", [("--think", "--system", "Be brief.", "--steps", "3"),
                                   ("--raw", "--entropy-bound", "0.5", "--steps", "2")])
def test_run_server_prints_what_a_local_run_prints(exact_server, tiny_checkpoint, flags):
    common = ("run", "--seed", "5", "-n", "40", *flags, "--no-stdin", PROMPT)
    local_plain = ok(run_cli(*common, "-m", str(tiny_checkpoint), "-q"))
    remote_plain = ok(remote(*common, "-q", server=exact_server))
    assert remote_plain.stdout == local_plain.stdout and remote_plain.stdout.strip()
    local = json.loads(ok(run_cli(*common, "-m", str(tiny_checkpoint), "--json", "-q")).stdout)
    answer = json.loads(ok(remote(*common, "--json", "-q", server=exact_server)).stdout)
    assert list(answer) == list(local) and untimed(answer) == untimed(local)
    assert answer["tokens"] and answer["settings"]["seed"] == 5


def test_show_steps_and_trace_from_a_server_draw_what_a_local_run_draws(exact_server, tiny_checkpoint, tmp_path):
    common = ("run", "--seed", "3", "-n", "40", "--steps", "4", "--show-steps", "--no-stdin", PROMPT)
    local = ok(run_cli(*common, "-m", str(tiny_checkpoint), "-q", "--trace", str(tmp_path / "local.jsonl")))
    there = ok(remote(*common, "-q", "--trace", str(tmp_path / "remote.jsonl"), server=exact_server))
    assert there.stdout == local.stdout

    def lines(done):  # the plain step log (stderr is not a terminal), elapsed times aside
        return re.sub(r"t=[0-9.]+s", "t=", done.stderr.decode()).splitlines()

    assert lines(there) == lines(local) and len(lines(local)) > 3

    def trace(path: Path) -> list[dict]:
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            record.pop("elapsed", None)
            if record["type"] == "result":
                record = untimed(record)
            out.append(record)
        return out

    assert trace(tmp_path / "remote.jsonl") == trace(tmp_path / "local.jsonl")
    replayed = ok(run_cli("replay", str(tmp_path / "remote.jsonl")))
    assert replayed.stdout == local.stdout


def test_stats_from_a_server_are_the_local_stats_line(exact_server, tiny_checkpoint):
    common = ("run", "--seed", "2", "-n", "24", "--steps", "2", "--stats", "--no-stdin", PROMPT)
    local = ok(run_cli(*common, "-m", str(tiny_checkpoint), "-q")).stderr.decode().strip().splitlines()[-1]
    there = ok(remote(*common, "-q", server=exact_server)).stderr.decode().strip().splitlines()[-1]
    timeless = re.compile(r"in [0-9.]+ s \([0-9.]+ tok/s\)")
    assert timeless.sub("", there) == timeless.sub("", local) and "steps " in there


def test_diffgen_server_env_and_failures_are_one_line(exact_server, tmp_path):
    by_env = ok(run_cli("run", "--seed", "1", "-n", "8", "--steps", "1", "-q", "--no-stdin", "Hi",
                        env={"DIFFGEN_SERVER": exact_server.url, "DIFFGEN_API_KEY": KEY}))
    assert by_env.stdout.strip()
    refused = run_cli("run", "--server", f"http://127.0.0.1:{free_port()}", "--no-stdin", "Hi")
    wrong_key = remote("run", "--no-stdin", "Hi", server=exact_server, key="nope")
    too_long = remote("run", "-n", "100000", "--no-stdin", "Hi", server=exact_server)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("one\ntwo\n")
    batch_key = remote("batch", str(jobs), "-o", str(tmp_path / "out.jsonl"), server=exact_server, key="nope")
    for done, words in ((refused, "connection refused"), (wrong_key, "DIFFGEN_API_KEY"),
                        (too_long, "context"), (batch_key, "DIFFGEN_API_KEY")):
        err = done.stderr.decode()
        assert done.returncode == 1 and done.stdout == b""
        assert err.count("\n") == 1 and err.startswith("diffgen: error: ") and words in err, err
    for flag in (("--quant", "int8"), ("--device", "cpu"), ("--exact",), ("--compile",)):
        local_only = remote("run", *flag, "--no-stdin", "Hi", server=exact_server)
        assert local_only.returncode == 2 and flag[0] in local_only.stderr.decode()
        assert "Traceback" not in local_only.stderr.decode()


# -- a plain OpenAI-compatible server (no diffgen fields), as vLLM would answer ----------------------------


class Plain:
    """A minimal OpenAI-compatible server: answers ``echo: <last user text>``; a prompt containing
    ``boom`` gets a 500 error object while ``failing``; ``busy`` gets one 429 with Retry-After 0 first.
    ``gate`` (a Barrier) holds the first requests until that many are in flight together."""

    def __init__(self):
        self.failing = True
        self.busy_seen: set[str] = set()
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests: list[dict] = []
        self.gate: threading.Barrier | None = None
        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def _handler(self):
        plain = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self.send(200, {"object": "list", "data": [{"id": "plain/model", "object": "model"}]})
                self.send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with plain.lock:
                    plain.requests.append(body)
                    plain.in_flight += 1
                    plain.most_in_flight = max(plain.most_in_flight, plain.in_flight)
                    gate = plain.gate if len(plain.requests) <= (plain.gate.parties if plain.gate else 0) else None
                try:
                    if gate is not None:
                        try:
                            gate.wait(timeout=120)  # a failure's safety net only: all parties arrive at once
                        except threading.BrokenBarrierError:  # the test gave up on this request
                            return
                    self.answer(body)
                finally:
                    with plain.lock:
                        plain.in_flight -= 1

            def answer(self, body: dict):
                text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
                if "boom" in text and plain.failing:
                    return self.send(500, {"error": {"message": "the GPU caught fire", "type": "server_error"}})
                if "busy" in text and text not in plain.busy_seen:
                    plain.busy_seen.add(text)
                    return self.send(429, {"error": {"message": "queue full"}}, {"Retry-After": "0"})
                choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
                if "messages" in body:
                    choice["message"] = {"role": "assistant", "content": f"echo: {text}"}
                    kind = "chat.completion"
                else:
                    choice["text"] = f"echo: {text}"
                    kind = "text_completion"
                self.send(200, {"id": "x", "object": kind, "created": 0, "model": "plain/model",
                                "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                               "total_tokens": 5}})

        return Handler

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture()
def plain():
    server = Plain()
    yield server
    server.close()


def test_run_against_a_plain_openai_server(plain):
    done = ok(remote("run", "--no-stdin", "--stats", "Hello", server=plain))
    assert done.stdout == b"echo: Hello\n"
    assert "2 tokens in" in done.stderr.decode() and "not a diffgen server" in done.stderr.decode()
    sent = plain.requests[-1]
    assert sent["model"] == "plain/model" and sent["messages"] == [{"role": "user", "content": "Hello"}]
    record = json.loads(ok(remote("run", "--json", "--steps", "3", "-n", "9", "--seed", "4", "--raw", "--no-stdin",
                                  "Hi", server=plain)).stdout)
    assert record["text"] == "echo: Hi" and record["tokens"] is None and record["stats"] is None
    assert record["settings"] == {"max_new_tokens": 9, "max_denoising_steps": 3, "seed": 4}
    assert plain.requests[-1] == {"model": "plain/model", "seed": 4, "return_token_ids": True, "max_tokens": 9,
                                  "steps": 3, "prompt": "Hi"}
    steps = remote("run", "--show-steps", "--no-stdin", "Hi", server=plain)
    assert steps.returncode == 2 and "does not stream denoising steps" in steps.stderr.decode()


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batch_server_keeps_n_in_flight_and_a_failure_is_an_error_record_that_resume_retries(plain, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    prompts = {1: "one", 2: "boom", 3: "busy", 4: "four", "five": "five", 6: "six", 7: "seven"}
    jobs.write_text("".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in prompts.items()))
    out = tmp_path / "out.jsonl"
    plain.gate = threading.Barrier(3)
    first = remote("batch", str(jobs), "-o", str(out), "--concurrency", "3", server=plain)
    assert first.returncode == 1 and "rerun with --resume" in first.stderr.decode()
    assert plain.most_in_flight == 3  # the first three were held until all three were in flight
    records = read_records(out)
    assert sorted(json.dumps(r["id"]) for r in records) == sorted(json.dumps(k) for k in prompts)
    failed = [r for r in records if "error" in r]
    assert [r["id"] for r in failed] == [2] and "the GPU caught fire" in failed[0]["error"]
    assert {r["id"]: r["text"] for r in records if "error" not in r}[3] == "echo: busy"  # a 429 is waited out
    plain.failing = False
    ok(remote("batch", str(jobs), "-o", str(out), "--resume", server=plain))
    records = read_records(out)
    assert sorted(json.dumps(r["id"]) for r in records) == sorted(json.dumps(k) for k in prompts)
    assert not any("error" in r for r in records)
    assert {r["id"]: r["text"] for r in records} == {k: f"echo: {v}" for k, v in prompts.items()}
    refused = remote("batch", str(jobs), "--batch-size", "4", server=plain)
    assert refused.returncode == 2 and "--batch-size" in refused.stderr.decode()


# -- a server killed mid-batch ----------------------------------------------------------------------------


def test_ctrl_c_during_a_batch_with_requests_in_flight_exits_at_once(plain, tmp_path):
    """Regression: the request threads were a ThreadPoolExecutor's, which Python joins at exit, so
    Ctrl-C waited for every generation in flight (forever against a server that never answers)."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"q{i}"}) + "\n" for i in range(6)))
    plain.gate = threading.Barrier(3)  # the first requests are held: only 2 are ever in flight
    process = subprocess.Popen([sys.executable, "-m", "diffgen", "batch", str(source), "--server", plain.url,
                                "--concurrency", "2", "-o", str(tmp_path / "out.jsonl")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"})
    try:
        while plain.gate.n_waiting < 2 and process.poll() is None:  # both requests are in flight
            threading.Event().wait(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)  # a hang's safety net; the exit itself is immediate
    finally:
        plain.gate.abort()
        process.kill()
    assert process.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()
    assert read_records(tmp_path / "out.jsonl") == []  # nothing answered, nothing written: --resume does all


def test_a_server_killed_mid_batch_then_restarted_and_resumed_holds_every_id_once(tiny_checkpoint, tmp_path):
    count = 200
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(f"prompt number {i}\n" for i in range(count)))
    out = tmp_path / "out.jsonl"
    served = start_server(tiny_checkpoint, tmp_path / "first.log")
    try:
        batch = subprocess.Popen([sys.executable, "-m", "diffgen", "batch", str(jobs), "-o", str(out), "--server",
                                  served.url, "--concurrency", "2", "-n", "16", "--steps", "4", "-q"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
        while not out.exists() or out.read_bytes().count(b"\n") < 3:  # wait on records, not on time
            assert batch.poll() is None, batch.stderr.read().decode()
            threading.Event().wait(0.02)  # how often to look
        served.process.send_signal(signal.SIGKILL)
        served.process.wait()
        err = batch.communicate()[1].decode()
    finally:
        stop_server(served)
    assert batch.returncode == 1 and "rerun with --resume" in err and "Traceback" not in err
    assert err.count("\n") == 1, err
    before = read_records(out)
    assert 3 <= len(before) < count and not any("error" in r for r in before)
    again = start_server(tiny_checkpoint, tmp_path / "second.log")
    try:
        ok(run_cli("batch", str(jobs), "-o", str(out), "--server", again.url, "--resume", "-n", "16", "--steps", "4",
                   "-q"))
    finally:
        stop_server(again)
    records = read_records(out)
    assert sorted(r["id"] for r in records) == list(range(1, count + 1))
    assert not any("error" in r for r in records)
    assert records[: len(before)] == before  # what was written before the kill stays as it was


@pytest.mark.parametrize(("given", "root"), [("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
                                             ("127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
                                             ("https://gpu-node/v1/", "https://gpu-node/v1")])
def test_the_server_url_is_the_api_root_however_it_is_typed(given, root):
    from diffgen.remote.client import base_url

    assert base_url(given) == root


def test_a_stream_cut_before_done_is_an_error_not_a_short_answer():
    """A server that dies mid-answer closes the stream without ``data: [DONE]``: the client says so
    instead of handing on the truncated text as if it were the whole answer (chat would keep it)."""
    from diffgen.remote.client import Client, RemoteError

    class Cut(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            chunk = {"choices": [{"index": 0, "delta": {"content": "half an ans"}, "finish_reason": None}]}
            data = f"data: {json.dumps(chunk)}\n\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    http = ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{http.server_address[1]}") as client:
            chunks = []
            with pytest.raises(RemoteError, match="closed the stream before the answer ended"):
                for chunk in client.stream({"messages": [{"role": "user", "content": "hi"}]}, chat=True):
                    chunks.append(chunk)
            assert len(chunks) == 1
    finally:
        http.shutdown()
        http.server_close()


@pytest.mark.parametrize("header, seconds", [("nan", 1.0), ("inf", 1.0), ("-3", 0.1), ("2.5", 2.5), ("soon", 1.0)])
def test_retry_after_is_a_finite_wait_whatever_the_server_sends(header, seconds):
    from diffgen.remote.client import _retry_after

    assert _retry_after(header) == seconds
