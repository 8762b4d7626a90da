"""`diffgen serve`: a real server in a subprocess, spoken to by the official `openai` client, plus
in-process requests (Starlette's TestClient) where a real process adds nothing.

Exactness: with a seed and the exact sampler a server answer has the same tokens and text as
`diffgen run --exact --seed` and as the library's generate() with the same settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch

from conftest import run_cli, start_server, stop_server
from diffgen import prompt as prompt_mod
from diffgen.denoise import loop
from diffgen.denoise.channels import split_response
from diffgen.server import answers, openapi, wire
from diffgen.server.app import Engine, create_app

USER = [{"role": "user", "content": "Why is the sky blue?"}]


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                         **kwargs)


def model_id(checkpoint) -> str:
    return str(checkpoint)


# -- the real server and the official client ---------------------------------------------------------


def test_models_lists_the_served_model(server, tiny_checkpoint):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [model_id(tiny_checkpoint)]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_chat_answer_has_the_tokens_of_diffgen_run_exact_seed(server, tiny_checkpoint):
    answer = client(server).chat.completions.create(
        model=model_id(tiny_checkpoint), messages=USER, seed=5, max_tokens=40,
        extra_body={"steps": 4, "return_token_ids": True})
    done = run_cli("run", "-m", str(tiny_checkpoint), "--exact", "--seed", "5", "-n", "40", "--steps", "4", "--json",
                   "-q", "--no-stdin", USER[0]["content"])
    assert done.returncode == 0, done.stderr.decode()
    local = json.loads(done.stdout)
    choice = answer.choices[0]
    assert choice.model_extra["token_ids"] == local["tokens"]
    assert choice.message.content == local["text"]
    assert choice.message.reasoning_content == local["thoughts"]
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[local["finish_reason"]]
    assert answer.usage.completion_tokens == len(local["tokens"])
    assert answer.usage.prompt_tokens == local["stats"]["prompt_tokens"]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")


def test_completion_answer_is_generate_with_the_same_settings(server, tiny, tiny_checkpoint):
    answer = client(server).completions.create(model=model_id(tiny_checkpoint), prompt="Once upon a time", seed=2,
                                               max_tokens=24, extra_body={"steps": 3, "entropy_bound": 0.5})
    ids = prompt_mod.encode(tiny.tokenizer, "Once upon a time", raw=True)
    settings = tiny.defaults.replace(max_new_tokens=24, max_denoising_steps=3, entropy_bound=0.5, seed=2)
    expected = loop.generate(tiny, [ids], settings, execution=loop.Execution(exact=True)).completions[0]
    assert answer.choices[0].text == expected.text
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.usage.prompt_tokens == len(ids)


def test_streamed_chat_joins_to_the_unstreamed_answer(server, tiny_checkpoint):
    api = client(server)
    request = {"model": model_id(tiny_checkpoint), "messages": USER, "seed": 11, "max_tokens": 48,
               "extra_body": {"steps": 3, "stability": 0}}
    whole = api.chat.completions.create(**request)
    chunks = list(api.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_streamed_completion_ends_with_done_and_joins_to_the_answer(server, tiny_checkpoint):
    body = {"model": model_id(tiny_checkpoint), "prompt": "Hello", "seed": 4, "max_tokens": 32, "steps": 2}
    whole = httpx.post(server.url + "/v1/completions", json=body).json()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_n_choices_use_consecutive_seeds(server, tiny_checkpoint):
    api = client(server)
    base = {"model": model_id(tiny_checkpoint), "prompt": "Hi", "max_tokens": 16, "extra_body": {"steps": 2}}
    both = api.completions.create(**base, seed=7, n=2)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == api.completions.create(**base, seed=7).choices[0].text
    assert both.choices[1].text == api.completions.create(**base, seed=8).choices[0].text


def test_stop_cuts_the_answer_before_the_stop_string(server, tiny_checkpoint):
    api = client(server)
    base = {"model": model_id(tiny_checkpoint), "prompt": "Hi", "max_tokens": 32, "extra_body": {"steps": 2}}
    seed, text = next((seed, text) for seed in range(50)
                      if len(text := api.completions.create(**base, seed=seed).choices[0].text.strip()) >= 4)
    stop = text[2:4]
    cut = api.completions.create(**base, seed=seed, stop=[stop]).choices[0]
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    streamed = api.completions.create(**base, seed=seed, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


# -- response_format json_schema: JSON by construction ---------------------------------------------------

CLUB = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green"]}, "maxItems": 2},
    "member": {"type": "boolean"}}, "required": ["name", "age", "tags", "member"], "additionalProperties": False}


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "club", "schema": schema, "strict": True}}


def test_a_json_schema_answer_parses_and_validates_for_every_seed(server, tiny_checkpoint):
    api = client(server)
    for seed in range(4):
        answer = api.chat.completions.create(model=model_id(tiny_checkpoint), messages=USER, seed=seed,
                                             response_format=json_schema(CLUB), extra_body={"steps": 3})
        message = answer.choices[0].message
        jsonschema.validate(json.loads(message.content), CLUB)
        assert message.reasoning_content is None and answer.choices[0].finish_reason == "stop"
        assert answer.usage.completion_tokens > 0
    text = api.completions.create(model=model_id(tiny_checkpoint), prompt="A member:", seed=1,
                                  extra_body={"response_format": json_schema(CLUB), "steps": 3})
    jsonschema.validate(json.loads(text.choices[0].text), CLUB)


def test_the_clients_parse_helper_gets_its_pydantic_model(server, tiny_checkpoint):
    class Member(pydantic.BaseModel):
        name: str
        age: int
        active: bool

    answer = client(server).chat.completions.parse(model=model_id(tiny_checkpoint), messages=USER, seed=2,
                                                   response_format=Member, extra_body={"steps": 3})
    member = answer.choices[0].message.parsed
    assert isinstance(member, Member) and member == Member.model_validate_json(answer.choices[0].message.content)


def test_a_json_schema_answer_is_run_schema_with_the_same_seed(server, tiny_checkpoint, tmp_path):
    path = tmp_path / "club.json"
    path.write_text(json.dumps(CLUB), encoding="utf-8")
    api = client(server)
    answer = api.chat.completions.create(model=model_id(tiny_checkpoint), messages=USER, seed=5,
                                         response_format=json_schema(CLUB), extra_body={"steps": 4})
    done = run_cli("run", "-m", str(tiny_checkpoint), "--exact", "--seed", "5", "--steps", "4", "--schema", str(path),
                   "-q", "--no-stdin", USER[0]["content"])
    assert done.returncode == 0, done.stderr.decode()
    assert answer.choices[0].message.content == done.stdout.decode().rstrip("\n")
    chunks = list(api.chat.completions.create(model=model_id(tiny_checkpoint), messages=USER, seed=5, stream=True,
                                              response_format=json_schema(CLUB), extra_body={"steps": 4}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    plain = {"model": model_id(tiny_checkpoint), "messages": USER, "seed": 5, "max_tokens": 16,
             "extra_body": {"steps": 2}}
    assert api.chat.completions.create(**plain, response_format={"type": "text"}).choices[0].message.content == \
        api.chat.completions.create(**plain).choices[0].message.content


@pytest.mark.parametrize(("response_format", "extra", "param", "words"), [
    (json_schema({"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z]"}},
                  "required": ["name"]}), {}, "response_format", "pattern at /name"),
    (json_schema({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                  "required": ["a"]}), {}, "response_format", "anyOf at /a"),
    (json_schema({"type": "object", "properties": {"a": {"type": "string"}}}), {}, "response_format",
     "optional properties (a)"),
    ({"type": "json_object"}, {}, "response_format", "needs a schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, {}, "response_format.json_schema.schema", "required"),
    (json_schema(CLUB), {"stop": ["}"]}, "stop", "cut the JSON"),
    (json_schema(CLUB), {"extra_body": {"think": True}}, "response_format", "thinking"),
])
def test_an_unsupported_response_format_is_a_422_naming_it(server, tiny_checkpoint, response_format, extra, param,
                                                           words):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client(server).chat.completions.create(model=model_id(tiny_checkpoint), messages=USER,
                                               response_format=response_format, **extra)
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"] and "\n" not in error["message"]


@pytest.mark.parametrize(("extra", "status", "param", "code"), [
    ({"model": "someone/else"}, 404, "model", "model_not_found"),
    ({"extra_body": {"steps": 0}}, 422, "steps", "invalid_value"),
    ({"extra_body": {"entropy_bound": "a lot"}}, 422, "entropy_bound", "invalid_value"),
    ({"extra_body": {"t_min": 0.9, "t_max": 0.5}}, 422, "t_max", "invalid_value"),
    ({"seed": -1}, 422, "seed", "invalid_value"),
    ({"n": 99}, 422, "n", "invalid_value"),
    ({"max_tokens": 100_000}, 400, "messages", "context_length_exceeded"),
])
def test_bad_requests_get_openai_errors(server, tiny_checkpoint, extra, status, param, code):
    request = {"model": model_id(tiny_checkpoint), "messages": USER, **extra}
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).chat.completions.create(**request)
    error = caught.value
    assert error.status_code == status
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.body["param"] == param and error.body["code"] == code
    assert error.body["message"] and "Traceback" not in error.response.text


def test_malformed_json_and_big_bodies_are_refused_and_the_server_goes_on(server):
    url = server.url + "/v1/chat/completions"
    bad = httpx.post(url, content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    big = httpx.post(url, content=b"x" * (4 * 1024 * 1024 + 1))
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    missing = httpx.get(server.url + "/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/health").status_code == 200
    assert "Traceback" not in server.stderr()


def test_a_key_is_checked_and_sigterm_lets_the_stream_in_flight_finish(tiny_checkpoint, tmp_path):
    served = start_server(tiny_checkpoint, tmp_path / "stderr.log", env={"DIFFGEN_API_KEY": "s3cret"})
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            client(served, api_key="wrong").models.list()
        assert caught.value.body["code"] == "invalid_api_key"
        assert httpx.get(served.url + "/health").status_code == 200  # health needs no key
        api = client(served, api_key="s3cret")
        stream = api.chat.completions.create(model=model_id(tiny_checkpoint), messages=USER, seed=1, max_tokens=256,
                                             stream=True, extra_body={"steps": 8, "stability": 0})
        chunks = [next(iter(stream))]  # the first chunk: the request is in flight
        served.process.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        served.process.wait()
        # uvicorn re-raises the signal once drained: the process ends by SIGTERM, as it was asked to.
        assert served.process.returncode in (0, -signal.SIGTERM)
        log = served.stderr()
        assert "Finished server process" in log and "Traceback" not in log
    finally:
        stop_server(served)


def test_any_address_but_loopback_needs_a_key(tiny_checkpoint):
    done = run_cli("serve", "-m", str(tiny_checkpoint), "--host", "0.0.0.0", env={"DIFFGEN_API_KEY": ""})
    assert done.returncode == 2
    assert b"DIFFGEN_API_KEY" in done.stderr and b"Traceback" not in done.stderr


# -- in process -----------------------------------------------------------------------------------------


@pytest.fixture()
def app_client(tiny):
    from starlette.testclient import TestClient

    engine = Engine(loaded=tiny, name="tiny", settings=tiny.defaults, exact=True)
    with TestClient(create_app(engine, api_key="k"), raise_server_exceptions=False,
                    headers={"Authorization": "Bearer k"}) as http:
        yield http, engine


def test_the_key_is_needed_on_every_v1_route(tiny):
    from starlette.testclient import TestClient

    http = TestClient(create_app(Engine(loaded=tiny, name="tiny", settings=tiny.defaults), api_key="k"))
    body = {"messages": USER, "max_tokens": 4, "steps": 1}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k"}):
        answer = http.post("/v1/chat/completions", json=body, headers=headers)
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models", headers=headers).status_code == 401
    assert http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}).status_code == 200


def test_a_failing_request_is_a_500_error_object_and_the_server_goes_on(app_client, monkeypatch):
    http, engine = app_client

    def broken(*args, **kwargs):
        raise RuntimeError("the accelerator fell over")

    monkeypatch.setattr(loop, "generate", broken)
    monkeypatch.setattr(loop, "stream", broken)  # the serial path streams, sent whole or not
    failed = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error" and "Traceback" not in failed.text
    assert not engine.lock.locked()
    monkeypatch.undo()
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "steps": 1}).status_code == 200


def _thinking_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a thought channel and an answer, as the model writes them (two canvases' worth)."""
    thought = tokenizer("<|channel>thought\nThe user greets me", add_special_tokens=False)["input_ids"]
    answer = tokenizer("<channel|>Hello there", add_special_tokens=False)["input_ids"]
    assert 100 in thought and 101 in answer
    return thought, answer


class _Scripted:
    """A generation that commits given canvases (the routing under test, not the sampler)."""

    def __init__(self, tokenizer, canvases: list[list[int]], settings):
        self.canvases, self.tokenizer, self.settings = canvases, tokenizer, settings

    def __iter__(self):
        for index, tokens in enumerate(self.canvases):
            yield loop.CanvasEvent(canvas=index, canvases=len(self.canvases), tokens=torch.tensor([tokens]), steps=1,
                                   finished=torch.tensor([False]), elapsed=0.0)

    @property
    def result(self):
        ids = [t for canvas in self.canvases for t in canvas]
        response = split_response(self.tokenizer, ids)
        stats = loop.CompletionStats(prompt_tokens=1, new_tokens=len(ids), canvases=len(self.canvases),
                                     steps_per_canvas=(1,) * len(self.canvases), tokens_per_forward=1.0, seconds=1.0,
                                     tokens_per_second=1.0, peak_memory_bytes=None)
        completion = loop.Completion(response.text, response.thoughts, tuple(ids), "length", stats)
        return loop.GenerationResult((completion,), self.settings)


def test_thoughts_go_to_reasoning_content_never_to_content(app_client, tiny, monkeypatch):
    http, _ = app_client
    canvases = list(_thinking_tokens(tiny.tokenizer))
    monkeypatch.setattr(loop, "stream", lambda loaded, prompts, settings, **kw: _Scripted(tiny.tokenizer, canvases,
                                                                                          settings))
    monkeypatch.setattr(loop, "generate", lambda loaded, prompts, settings, **kw: _Scripted(
        tiny.tokenizer, canvases, settings).result)
    body = {"messages": USER, "think": True, "max_tokens": 64}
    message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["content"] == "Hello there"
    assert message["reasoning_content"] == "The user greets me"
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    # One delta per committed canvas: the first canvas held the thoughts, the second the answer.
    assert [sorted(d) for d in deltas] == [["reasoning_content", "role"], ["content"], []]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user greets me"
    assert "".join(d.get("content") or "" for d in deltas) == "Hello there"
    assert all("greets" not in (d.get("content") or "") and "<|channel>" not in (d.get("content") or "")
               for d in deltas)


def test_chat_template_gets_the_whole_conversation(app_client, tiny):
    http, engine = app_client
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    request = wire.parse_chat({"messages": turns})
    expected = prompt_mod.encode_messages(tiny.tokenizer, [{"role": t["role"], "content": "Bye" if isinstance(
        t["content"], list) else t["content"]} for t in turns])
    assert engine.prompt_ids(request) == expected
    answer = http.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 4, "steps": 1}).json()
    assert answer["usage"]["prompt_tokens"] == len(expected)


# -- the wire format on its own -------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": USER, "steps": True}, "steps"),
    ({"messages": USER, "steps": 2.5}, "steps"),
    ({"messages": USER, "confidence": float("nan")}, "confidence"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": 4, "max_new_tokens": 4}, "max_tokens"),
    ({"messages": USER, "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": [], "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": USER, "stream": "yes"}, "stream"),
])
def test_parameters_are_checked_like_the_cli(body, param):
    with pytest.raises(wire.ApiError) as caught:
        wire.parse_chat(body)
    assert caught.value.status == 422 and caught.value.param == param


def test_sampler_fields_map_to_settings_names():
    request = wire.parse_chat({"messages": USER, "steps": 3, "entropy_bound": 1, "t_min": 0.1, "t_max": 0.2,
                               "stability": 0, "confidence": 0.5, "max_tokens": 9, "seed": 3})
    assert request.flags == {"max_denoising_steps": 3, "entropy_bound": 1, "t_min": 0.1, "t_max": 0.2,
                             "stability_threshold": 0, "confidence_threshold": 0.5, "max_new_tokens": 9}
    assert request.seed == 3 and request.choice_seed(1) == 4


def test_deltas_hold_back_what_could_start_a_stop_string():
    deltas = answers.Deltas(("END",))
    assert deltas.update("Hello E") == "Hello"  # "E" could start "END"
    assert deltas.update("Hello EN") == " "
    assert deltas.update("Hello ENDING") == ""
    assert deltas.stopped and deltas.sent == "Hello "
    assert deltas.update("Hello ENDING more", final=True) == ""
    plain = answers.Deltas(())
    assert plain.update("ab\ufffd") == "ab"  # half a character: wait for the next canvas
    assert plain.update("abc") == "c" and plain.update("abcd", final=True) == "d"



class _Failing(_Scripted):
    def __iter__(self):
        yield from list(super().__iter__())[:1]
        raise RuntimeError("the accelerator fell over")


def test_a_failure_mid_stream_ends_the_stream_with_an_error_object(app_client, tiny, monkeypatch):
    http, engine = app_client
    canvases = list(_thinking_tokens(tiny.tokenizer))
    monkeypatch.setattr(loop, "stream", lambda loaded, prompts, settings, **kw: _Failing(tiny.tokenizer, canvases,
                                                                                         settings))
    with http.stream("POST", "/v1/chat/completions", json={"messages": USER, "stream": True}) as response:
        assert response.status_code == 200  # the headers went out before the failure
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert not engine.lock.locked()
    monkeypatch.undo()
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "steps": 1}).status_code == 200


def test_a_chunked_body_over_the_limit_wrong_methods_and_the_schema(tiny):
    from starlette.testclient import TestClient

    http = TestClient(create_app(Engine(loaded=tiny, name="tiny", settings=tiny.defaults), max_body=2048))
    chunks = (b"x" * 1024 for _ in range(3))  # no Content-Length: counted as it arrives
    big = http.post("/v1/completions", content=chunks)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    wrong = http.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/health", "/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(paths)


# -- diffgen's extensions: stream_steps, diffgen_step / diffgen_canvas chunks, diffgen_stats --------------


def _events(http, path, body):
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def test_stream_steps_sends_the_records_a_local_run_draws(app_client, tiny):
    from diffgen.records import trace

    http, _ = app_client
    body = {"prompt": "Once upon a time", "seed": 3, "max_tokens": 40, "steps": 3, "stream": True,
            "stream_steps": True}
    chunks = _events(http, "/v1/completions", body)
    steps = [c["diffgen_step"] for c in chunks if "diffgen_step" in c]
    canvases = [c["diffgen_canvas"] for c in chunks if "diffgen_canvas" in c]
    assert all(c["object"] == "text_completion" and c["choices"][0]["text"] == "" for c in chunks
               if "diffgen_step" in c)
    ids = prompt_mod.encode(tiny.tokenizer, "Once upon a time", raw=True)
    settings = tiny.defaults.replace(max_new_tokens=40, max_denoising_steps=3, seed=3)
    generation = loop.stream(tiny, [ids], settings, execution=loop.Execution(exact=True))
    local = list(trace.records(generation, trace.TokenTexts(tiny.tokenizer)))
    local_steps = [r for r in local if isinstance(r, trace.StepRecord)]
    local_canvases = [r for r in local if isinstance(r, trace.CanvasRecord)]
    assert len(steps) == len(local_steps) and len(canvases) == len(local_canvases) >= 1
    contract = {"index", "canvas", "canvases", "step", "max_steps", "temperature", "elapsed", "draft", "canvas_tokens",
                "accepted", "token_entropy", "mean_entropy", "finished", "fixed"}  # CONTRACT12.md
    for sent, record in zip(steps, local_steps):
        assert contract <= set(sent) and sent["index"] == 0
        assert sent["canvas_tokens"] == record.tokens and sent["draft"] == record.draft
        assert sent["accepted"] == [int(a) for a in record.accepted] and sent["texts"] == record.texts
        assert sent["token_entropy"] == record.entropy and sent["finished"] == record.finished
        assert (sent["step"], sent["max_steps"], sent["canvas"]) == (record.step, record.max_steps, record.canvas)
    for sent, record in zip(canvases, local_canvases):
        assert (sent["tokens"], sent["texts"], sent["steps"], sent["finished"]) == \
            (record.tokens, record.texts, record.steps, record.finished)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    stats = finish[-1]["choices"][0]["diffgen_stats"]
    expected = generation.result.completions[0].stats
    assert stats["new_tokens"] == expected.new_tokens and stats["steps_per_canvas"] == list(expected.steps_per_canvas)


def test_a_chat_stream_with_steps_starts_with_the_role_and_joins_to_the_answer(app_client):
    http, _ = app_client
    body = {"messages": USER, "seed": 2, "max_tokens": 24, "steps": 2}
    whole = http.post("/v1/chat/completions", json=body).json()
    chunks = _events(http, "/v1/chat/completions", {**body, "stream": True, "stream_steps": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"} and "diffgen_step" in chunks[0]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == \
        whole["choices"][0]["message"]["content"]
    assert sum("diffgen_step" in c for c in chunks) >= 2


def test_every_choice_carries_its_stats_and_steps_are_only_sent_when_asked(app_client):
    http, _ = app_client
    answer = http.post("/v1/completions", json={"prompt": "Hi", "seed": 1, "max_tokens": 16, "steps": 2,
                                                "n": 2}).json()
    for choice in answer["choices"]:
        stats = choice["diffgen_stats"]
        assert set(stats) == {f.name for f in dataclasses.fields(loop.CompletionStats)}
        assert stats["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert sum(c["diffgen_stats"]["new_tokens"] for c in answer["choices"]) == answer["usage"]["completion_tokens"]
    plain = _events(http, "/v1/completions", {"prompt": "Hi", "seed": 1, "max_tokens": 16, "steps": 2,
                                              "stream": True})
    assert not any("diffgen_step" in c or "diffgen_canvas" in c for c in plain)
    refused = http.post("/v1/completions", json={"prompt": "Hi", "stream_steps": True})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "stream_steps"


def test_the_model_card_tells_diffgen_clients_the_defaults(app_client, tiny):
    http, _ = app_client
    card = http.get("/v1/models").json()["data"][0]
    assert card["diffgen_settings"] == tiny.defaults.to_dict()
    assert card["diffgen_channel_ids"] == [100, 101]


# -- the server's bounds and its queue -----------------------------------------------------------------


def test_steps_over_max_steps_is_a_422_naming_the_limit_and_the_schema_says_so(tiny):
    from starlette.testclient import TestClient

    engine = Engine(loaded=tiny, name="tiny", settings=tiny.defaults, exact=True, max_steps=3)
    with TestClient(create_app(engine), raise_server_exceptions=False) as http:
        refused = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "steps": 100000000})
        # A stability of 10**9 once allocated a (10**9, rows, canvas) history: bounded the same way.
        unstable = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stability": 10**9})
        answered = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "steps": 3})
        document = http.get("/openapi.json").json()
    error = refused.json()["error"]
    assert refused.status_code == 422 and error["param"] == "steps"
    assert "at most 3" in error["message"] and "--max-steps" in error["message"]
    assert unstable.status_code == 422 and unstable.json()["error"]["param"] == "stability"
    assert answered.status_code == 200 and engine.admission.queued == 0
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["steps"]["maximum"] == body["properties"]["stability"]["maximum"] == 3
    assert openapi.body_schema("chat")["properties"]["steps"]["maximum"] == wire.DEFAULT_MAX_STEPS == Engine(
        loaded=tiny, name="t", settings=tiny.defaults).max_steps


def _hang_up_post(app, path: str, body: dict):
    """POST ``body`` straight through the ASGI interface from a client that has gone the moment its
    body is sent. Returns the coroutine and the list the response's messages go to."""
    sent: list[dict] = []
    state = {"body": False}

    async def receive() -> dict:
        if not state["body"]:
            state["body"] = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    return app(scope, receive, send), sent


def test_solo_requests_beyond_the_thread_pool_queue_and_the_next_gets_429(tiny):
    """More solo (exact) requests wait for the model than anyio has worker threads (40), and the queue,
    not the pool, bounds them: every one is admitted, the one over --max-queue gets 429 at once, and
    all the admitted ones are answered once the model is free."""
    import httpx

    engine = Engine(loaded=tiny, name="tiny", settings=tiny.defaults, exact=True, max_queue=48)
    app = create_app(engine)
    body = {"prompt": "Hi", "max_tokens": 4, "steps": 1}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=None) as http:
            engine.lock.acquire()  # a long generation holds the model
            try:
                waiting = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(48)]
                while engine.admission.queued < 48:  # every one admitted, its checks done in the pool
                    await asyncio.sleep(0.01)
                over = await http.post("/v1/completions", json=body)
                models = await http.get("/v1/models")
            finally:
                engine.lock.release()
            answers = await asyncio.gather(*waiting)
        return over, models, answers

    over, models, answers = asyncio.run(scenario())
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" in over.headers and models.status_code == 200
    assert [a.status_code for a in answers] == [200] * 48
    assert engine.admission.queued == 0 and engine.admission.rejected == 1 and engine.counters().requests_served == 48


def test_a_solo_request_whose_client_hangs_up_while_it_waits_never_runs(tiny):
    engine = Engine(loaded=tiny, name="tiny", settings=tiny.defaults, exact=True)
    app = create_app(engine)

    async def scenario():
        engine.lock.acquire()  # the model is busy: the request waits for it
        try:
            call, sent = _hang_up_post(app, "/v1/completions", {"prompt": "Hi", "max_tokens": 4, "steps": 1})
            await call  # answered (499) as soon as the hang-up is seen, while the generation still waits
        finally:
            engine.lock.release()
        while engine.counters().requests_cancelled < 1 or engine.lock.locked():
            await asyncio.sleep(0.01)  # the hang-up takes it out of the queue; the scheduler finds nothing to run
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 499
    counts = engine.counters()
    assert counts.decoder_forwards == 0 and counts.requests_served == 0 and engine.admission.queued == 0
    assert counts.rows_queued == 0 and counts.requests_queued == 0 and counts.rows_in_flight == 0


def test_a_fast_a_json_schema_and_an_exact_request_sent_together_are_answered_by_one_path(tiny):
    """Requests of the three kinds wait in the batcher's one queue while the model is busy: the fast
    one is a batch's row, the json_schema and exact ones run alone after it, in arrival order. Each
    answer is what it is alone, and /metrics counts all three in one set of counters. (The sampler
    is the server's: the exact request is queued after the engine is switched to the exact sampler.)"""
    from diffgen.denoise.constrained.schema import generate_json
    from diffgen.server.metrics import parse

    engine = Engine(loaded=tiny, name="tiny", settings=tiny.defaults, exact=False)
    app = create_app(engine)
    fixed = {"steps": 4, "stability": 0, "return_token_ids": True}
    bodies = {"fast": {"prompt": "Hi", "max_tokens": 32, "seed": 4, **fixed},
              "schema": {"messages": USER, "seed": 5, "steps": 3, "response_format": json_schema(CLUB)},
              "exact": {"prompt": "Once upon a time", "max_tokens": 32, "seed": 3, **fixed}}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=None) as http:
            engine.lock.acquire()  # the model is busy: every request waits in the queue
            try:
                sent = {}
                for name, body in bodies.items():
                    engine.exact = name == "exact"
                    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                    sent[name] = asyncio.create_task(http.post(path, json=body))
                    while engine.counters().requests_queued < len(sent):  # queued in arrival order
                        await asyncio.sleep(0.01)
            finally:
                engine.lock.release()
            answers = {name: (await task).json() for name, task in sent.items()}
            return answers, parse((await http.get("/metrics")).text)

    answers, counts = asyncio.run(scenario())
    fast, exact = (wire.parse_text(bodies[name]) for name in ("fast", "exact"))
    expected = {name: loop.generate(tiny, [engine.prompt_ids(request)], engine.settings_for(request, 0),
                                    execution=loop.Execution(exact=name == "exact")).completions[0]
                for name, request in (("fast", fast), ("exact", exact))}
    for name, completion in expected.items():
        assert answers[name]["choices"][0]["token_ids"] == list(completion.token_ids), name
        assert answers[name]["choices"][0]["text"] == completion.text, name
    schema = wire.parse_chat(bodies["schema"])
    json_answer = generate_json(tiny, engine.prompt_ids(schema), CLUB, engine.settings_for(schema, 0),
                              execution=loop.Execution(exact=False))
    assert answers["schema"]["choices"][0]["message"]["content"] == json_answer.text
    jsonschema.validate(json.loads(json_answer.text), CLUB)
    passes = sum(sum(completion.stats.steps_per_canvas) for completion in expected.values()) + json_answer.forwards
    assert counts["diffgen_requests_served_total"] == 3 and counts["diffgen_rows_served_total"] == 3
    assert counts["diffgen_requests_failed_total"] == counts["diffgen_requests_cancelled_total"] == 0
    assert counts["diffgen_decoder_forwards_total"] == passes and counts["diffgen_batches_total"] == 1
    assert counts["diffgen_rows_in_flight"] == counts["diffgen_rows_queued"] == counts["diffgen_queue_depth"] == 0
