"""`diffgen serve` batching requests together: real uvicorn servers in subprocesses, the official
`openai` client, and `GET /metrics`.

Queue states are made deterministic with the test-only hold file (``DIFFGEN_SERVE_HOLD``: while
it exists the scheduler waits at its next canvas boundary; a number N in it lets N more canvases
run first; installed in the server by tests/serve_hold/sitecustomize.py, ``conftest.serve_env``),
and the tests wait for states by reading /metrics, never on the clock.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import serve_env, start_server, stop_server
from diffgen import prompt as prompt_mod
from diffgen.denoise import loop
from diffgen.server.app import Engine, create_app
from diffgen.server.metrics import parse

PROMPTS = ["Once upon a time", "Hi", "The sky is blue because", "def main():"]
FIXED = {"steps": 4, "stability": 0}  # no adaptive stop: a fixed number of passes per canvas


def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def metrics(served) -> dict[str, float]:
    response = httpx.get(served.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def wait_for(served, since: dict[str, float] | None = None, **expected: float) -> dict[str, float]:
    """Read /metrics until every ``diffgen_<name>`` has its expected value (counted from the values in
    ``since`` when given); how often to look, not how long to wait."""
    since = since or {}
    while True:
        now = metrics(served)
        if all(now[f"diffgen_{name}"] - since.get(f"diffgen_{name}", 0) == value for name, value in expected.items()):
            return now
        assert served.process.poll() is None, served.stderr()
        time.sleep(0.02)


def serve(checkpoint, directory, hold, *args):
    return start_server(checkpoint, directory / f"stderr-{len(list(directory.iterdir()))}.log", *args,
                        env=serve_env(hold))


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A directory for a module's servers, and its hold file's path (absent: the scheduler runs)."""
    directory = tmp_path_factory.mktemp("held")
    return directory, directory / "hold"


@pytest.fixture(scope="module")
def batched(tiny_checkpoint, held):
    """``diffgen serve --max-batch 16`` with the module's hold file, shared (tests count from /metrics deltas)."""
    directory, hold = held
    served = serve(tiny_checkpoint, directory, hold, "--max-batch", "16")
    yield served
    stop_server(served)


@pytest.fixture()
def hold(held):
    """The hold file, removed again after each test."""
    path = held[1]
    yield path
    path.unlink(missing_ok=True)


def ask_all(served, model: str, count: int, tokens: int) -> list:
    api = client(served)
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(api.completions.create, model=model, prompt=PROMPTS[k % len(PROMPTS)], seed=k,
                               max_tokens=tokens, extra_body=FIXED) for k in range(count)]
        return [future.result() for future in futures]


def test_16_concurrent_clients_are_answered_in_fewer_decoder_passes_than_one_at_a_time(tiny_checkpoint, batched,
                                                                                    held, hold):
    model = str(tiny_checkpoint)
    passes = {}
    answers = {}
    sequential = serve(tiny_checkpoint, held[0], hold, "--max-batch", "1")
    try:
        for max_batch, served in ((16, batched), (1, sequential)):
            before = metrics(served)
            hold.write_text("0")  # every request waits at the first boundary: they arrive "together"
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(ask_all, served, model, 16, 32)
                wait_for(served, rows_in_flight=min(max_batch, 16), queue_depth=16 - min(max_batch, 16))
                hold.unlink()
                answers[max_batch] = pending.result()
            counts = wait_for(served, before, requests_served_total=16)
            wait_for(served, rows_in_flight=0, queue_depth=0)
            passes[max_batch] = tuple(counts[name] - before[name] for name in
                                      ("diffgen_decoder_forwards_total", "diffgen_row_forwards_total"))
            assert counts["diffgen_requests_rejected_total"] == 0
    finally:
        stop_server(sequential)
    assert all(len(a.choices) == 1 and a.choices[0].finish_reason in ("stop", "length") for a in answers[16])
    (batched, rows), (sequential, same_rows) = passes[16], passes[1]
    assert rows == same_rows and sequential == rows  # the same work; one row per pass when sequential
    assert batched < sequential
    # Same seeds, same rows: batched or not, the answers are the same.
    assert [a.choices[0].text for a in answers[16]] == [a.choices[0].text for a in answers[1]]


def test_a_request_joins_a_running_batch_at_a_canvas_boundary(tiny_checkpoint, batched, hold, tiny):
    model = str(tiny_checkpoint)
    served = batched
    before = metrics(served)
    api = client(served)
    hold.write_text("0")
    first_chunks: list = []
    body = {"model": model, "prompt": PROMPTS[0], "seed": 3, "max_tokens": 96, "stream": True,
            "extra_body": FIXED}
    streaming = threading.Thread(target=lambda: first_chunks.extend(api.completions.create(**body)))
    streaming.start()
    wait_for(served, rows_in_flight=1)
    hold.write_text("1")  # one canvas of the first request, then wait at the next boundary
    wait_for(served, before, batch_canvases_total=1)
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(api.completions.create, model=model, prompt=PROMPTS[2], seed=4, max_tokens=32,
                           extra_body={**FIXED, "return_token_ids": True})
        wait_for(served, rows_in_flight=2, queue_depth=0)  # admitted at the boundary: it joined
        hold.unlink()
        joined = late.result()
    streaming.join()
    counts = wait_for(served, before, requests_served_total=2)
    assert counts["diffgen_batches_total"] - before["diffgen_batches_total"] == 1
    assert first_chunks[-1].choices[0].finish_reason in ("stop", "length")
    ids = prompt_mod.encode(tiny.tokenizer, PROMPTS[2], raw=True)
    settings = tiny.defaults.replace(max_new_tokens=32, max_denoising_steps=4, stability_threshold=0, seed=4)
    expected = loop.generate(tiny, [ids], settings, execution=loop.Execution(exact=False)).completions[0]
    assert joined.choices[0].model_extra["token_ids"] == list(expected.token_ids)
    assert joined.choices[0].text == expected.text


def test_a_seeded_request_has_the_same_tokens_alone_and_batched(tiny_checkpoint, batched, hold):
    model = str(tiny_checkpoint)
    served = batched
    before = metrics(served)
    api = client(served)
    request = {"model": model, "messages": [{"role": "user", "content": "Why is the sky blue?"}], "seed": 11,
               "max_tokens": 48, "extra_body": {**FIXED, "return_token_ids": True}}
    alone = api.chat.completions.create(**request)
    hold.write_text("0")
    with ThreadPoolExecutor(4) as pool:
        together = [pool.submit(api.chat.completions.create, **request)]
        together += [pool.submit(api.completions.create, model=model, prompt=PROMPTS[k], seed=k, max_tokens=16 * k,
                                 extra_body=FIXED) for k in (1, 2, 3)]
        wait_for(served, rows_in_flight=4)
        hold.unlink()
        with_others = together[0].result()
        assert all(f.result().choices for f in together)
    assert with_others.choices[0].model_extra["token_ids"] == alone.choices[0].model_extra["token_ids"]
    assert with_others.choices[0].message.content == alone.choices[0].message.content
    streamed = list(api.chat.completions.create(**request, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == alone.choices[0].message.content
    assert metrics(served)["diffgen_batches_total"] - before["diffgen_batches_total"] == 3
    # n choices are n rows of one batch, choice i with seed + i, as separate requests would be.
    base = {"model": model, "prompt": "Hi", "max_tokens": 32, "extra_body": FIXED}
    both = api.completions.create(**base, seed=7, n=2)
    assert [c.text for c in both.choices] == [api.completions.create(**base, seed=seed).choices[0].text
                                              for seed in (7, 8)]


def raw_request(served, body: dict) -> socket.socket:
    """A non-streamed request sent on a bare socket, so the test can hang up while it waits."""
    port = int(served.url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_full_queue_gets_429_and_a_client_that_hangs_up_frees_its_place(tiny_checkpoint, held, hold):
    model = str(tiny_checkpoint)
    served = serve(tiny_checkpoint, held[0], hold, "--max-batch", "1", "--max-queue", "1")
    try:
        hold.write_text("0")
        body = {"model": model, "prompt": "Hi", "seed": 1, "max_tokens": 64, **FIXED}
        with httpx.stream("POST", served.url + "/v1/completions", json={**body, "stream": True}) as running:
            assert running.status_code == 200
            wait_for(served, rows_in_flight=1, queue_depth=0)
            waiting = raw_request(served, body)
            wait_for(served, queue_depth=1)
            with pytest.raises(openai.RateLimitError) as caught:
                client(served).completions.create(model=model, prompt="Hi", max_tokens=16)
            error = caught.value
            assert error.status_code == 429 and int(error.response.headers["Retry-After"]) >= 1
            assert error.body["code"] == "rate_limit_exceeded" and error.body["message"]
            assert metrics(served)["diffgen_requests_rejected_total"] == 1
            waiting.close()  # the waiting client hangs up: its place in the queue is free at once
            wait_for(served, queue_depth=0, requests_cancelled_total=1)
            with ThreadPoolExecutor(1) as pool:
                third = pool.submit(client(served).completions.create, model=model, prompt="Hi", seed=2,
                                    max_tokens=16, extra_body=FIXED)
                wait_for(served, queue_depth=1)
                # The running client hangs up: its row leaves at the boundary and the third takes the slot.
                running.close()
                wait_for(served, requests_cancelled_total=2, queue_depth=0, rows_in_flight=1)
                hold.unlink()
                assert third.result().choices[0].finish_reason in ("stop", "length")
        counts = wait_for(served, requests_served_total=1, rows_in_flight=0)
        assert counts["diffgen_batch_canvases_total"] == 1  # the cancelled rows never ran a canvas
        assert "Traceback" not in served.stderr()
    finally:
        stop_server(served)


def test_a_json_schema_request_waits_for_the_batch_before_it_and_nothing_overtakes_it(tiny_checkpoint, batched,
                                                                                      hold):
    """A json_schema request (run alone) that arrives while a batch runs waits in the queue, first
    come, first served: nothing of it runs while the batch is held at a boundary, and a fast request
    arriving after it does not join the running batch. The batch drains, the JSON request runs
    alone, then the late request forms a batch of its own."""
    model = str(tiny_checkpoint)
    before = metrics(batched)
    hold.write_text("0")
    api = client(batched)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(api.completions.create, model=model, prompt="Hi", seed=1, max_tokens=48,
                              extra_body=FIXED)
        wait_for(batched, rows_in_flight=1)
        answer = pool.submit(api.chat.completions.create, model=model, messages=[{"role": "user", "content": "Fine?"}],
                             seed=2, extra_body={"steps": 2},
                             response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}})
        wait_for(batched, rows_queued=1)
        late = pool.submit(api.completions.create, model=model, prompt="Hi", seed=3, max_tokens=16, extra_body=FIXED)
        held = wait_for(batched, rows_queued=2, rows_in_flight=1, queue_depth=2)
        assert held["diffgen_batch_canvases_total"] == before["diffgen_batch_canvases_total"]
        assert held["diffgen_requests_served_total"] == before["diffgen_requests_served_total"]
        hold.unlink()
        assert json.loads(answer.result().choices[0].message.content)["ok"] in (True, False)
        assert running.result().choices[0].finish_reason in ("stop", "length")
        assert late.result().choices[0].finish_reason in ("stop", "length")
    counts = wait_for(batched, before, requests_served_total=3)
    assert counts["diffgen_batches_total"] - before["diffgen_batches_total"] == 2  # the late one did not join


def test_metrics_write_large_counters_in_full(tiny):
    """A counter past 10**6 keeps every digit (``:g`` once wrote 1234567 as 1.23457e+06)."""
    from starlette.testclient import TestClient

    from diffgen.server.metrics import sample

    from diffgen.denoise.tickets import Counters

    engine = Engine(loaded=tiny, name="tiny", settings=tiny.defaults, exact=True)
    engine.admission.rejected = 1234567
    engine.batcher.counters = lambda: Counters(decoder_forwards=2**53 + 1)
    text = TestClient(create_app(engine)).get("/metrics").text
    assert "\ndiffgen_requests_rejected_total 1234567\n" in text
    assert f"\ndiffgen_decoder_forwards_total {2**53 + 1}\n" in text
    assert parse(text)["diffgen_requests_rejected_total"] == 1234567
    assert sample(0.1) == "0.1" and sample(1e-7) == "1e-07" and float(sample(1 / 3)) == 1 / 3
