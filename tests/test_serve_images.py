"""`diffgen serve` with images: `image_url` parts from the official `openai` client against a real
server, and refusals in-process (Starlette's TestClient) where a real process adds nothing."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import threading

import openai
import pytest

from diffgen.server.app import Engine, create_app
from tests.conftest import run_cli, start_server, stop_server, write_image

QUESTION = "What is in this picture?"


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("pictures") / "x.png", 36, 24, seed=4)


@pytest.fixture(scope="module")
def vision_server(vision_checkpoint, tmp_path_factory):
    served = start_server(vision_checkpoint, tmp_path_factory.mktemp("serve") / "stderr.log",
                          "--exact", "--allow-local-images", "--allow-remote-images")
    yield served
    stop_server(served)


@pytest.fixture(scope="module")
def remote(picture):
    """A plain HTTP server on the loopback that serves the picture's directory."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(picture.parent))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def test_a_data_url_image_answers_as_run_image_with_the_same_seed(vision_server, vision_checkpoint, picture, remote):
    api = _client(vision_server)
    answer = api.chat.completions.create(model=str(vision_checkpoint), messages=image_message(data_url(picture)),
                                         seed=5, max_tokens=32, extra_body={"return_token_ids": True})
    done = run_cli("run", "-m", str(vision_checkpoint), "--seed", "5", "--max-new-tokens", "32", "--json",
                   "--image", str(picture), QUESTION)
    assert done.returncode == 0, done.stderr.decode()
    record = json.loads(done.stdout)
    tokens = answer.choices[0].model_dump()["token_ids"]
    assert tokens == record["tokens"] and answer.choices[0].message.content == record["text"]
    assert answer.usage.prompt_tokens == record["stats"]["prompt_tokens"]
    # The same picture as a local file and as a remote URL (both allowed on this server).
    for url in (str(picture), picture.as_uri(), f"{remote}/{picture.name}"):
        again = api.chat.completions.create(model=str(vision_checkpoint), messages=image_message(url), seed=5,
                                            max_tokens=32, extra_body={"return_token_ids": True})
        assert again.choices[0].model_dump()["token_ids"] == tokens, url
    # Streamed, it joins to the same answer.
    chunks = api.chat.completions.create(model=str(vision_checkpoint), messages=image_message(data_url(picture)),
                                         seed=5, max_tokens=32, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == record["text"]


def test_a_bad_image_is_a_422_naming_the_part_and_the_server_goes_on(vision_server, vision_checkpoint, tmp_path):
    api = _client(vision_server)
    text_file = tmp_path / "notes.png"
    text_file.write_text("not a picture")
    bad = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    for url, words in ((bad, "is not an image pillow can read"), (str(text_file), "is not an image"),
                       (str(tmp_path / "missing.png"), "cannot read"),
                       ("data:image/png,rawbytes", "must be base64")):
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            api.chat.completions.create(model=str(vision_checkpoint), messages=image_message(url), max_tokens=8)
        error = caught.value.body
        assert words in error["message"] and error["param"] == "messages[0].content[0]", error
    ok = api.chat.completions.create(model=str(vision_checkpoint), messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=8)
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.fixture()
def strict(vision):
    """An in-process server on the vision checkpoint that allows neither local files nor remote URLs."""
    from starlette.testclient import TestClient

    with TestClient(create_app(Engine(loaded=vision, name="v", settings=vision.defaults, exact=True)),
                    raise_server_exceptions=False) as http:
        yield http


@pytest.mark.parametrize("url, code, flag", [
    ("/tmp/x.png", "local_images_disabled", "--allow-local-images"),
    ("file:///tmp/x.png", "local_images_disabled", "--allow-local-images"),
    ("https://example.com/x.png", "remote_images_disabled", "--allow-remote-images"),
])
def test_local_files_and_remote_urls_need_their_flag(strict, url, code, flag):
    answer = strict.post("/v1/chat/completions", json={"messages": image_message(url), "max_tokens": 4})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == code and flag in error["message"] and error["param"] == "messages[0].content[0]"


def test_image_parts_are_checked_before_anything_runs(strict, picture):
    cases = [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}], "url must be"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "must be an object with a url"),
        ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}}]}],
         "images go in user messages"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "image parts"),
    ]
    for messages, words in cases:
        answer = strict.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
        assert answer.status_code == 422 and words in answer.json()["error"]["message"], answer.json()
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {}}}}
    answer = strict.post("/v1/chat/completions", json={"messages": image_message(data_url(picture)),
                                                       "response_format": schema})
    assert answer.status_code == 422 and "does not combine with images" in answer.json()["error"]["message"]


def test_more_images_than_the_context_holds_is_a_400(vision, picture):
    from starlette.testclient import TestClient

    content = [{"type": "image_url", "image_url": {"url": data_url(picture)}}] * 80 + [{"type": "text", "text": "?"}]
    # --max-images raised past the 80 so that the context is what refuses them.
    with TestClient(create_app(Engine(loaded=vision, name="v", settings=vision.defaults, exact=True, max_images=80)),
                    raise_server_exceptions=False) as http:
        answer = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                         "max_tokens": 4})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"


def test_a_text_only_model_refuses_images_with_a_422(tiny, picture):
    from starlette.testclient import TestClient

    with TestClient(create_app(Engine(loaded=tiny, name="t", settings=tiny.defaults)),
                    raise_server_exceptions=False) as http:
        answer = http.post("/v1/chat/completions", json={"messages": image_message(data_url(picture)),
                                                         "max_tokens": 4})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "images_unsupported"


def test_run_server_sends_its_images_and_prints_what_a_local_run_prints(vision_server, vision_checkpoint, picture):
    local = run_cli("run", "-m", str(vision_checkpoint), "--seed", "5", "--max-new-tokens", "32", "--json",
                    "--image", str(picture), QUESTION)
    remote = run_cli("run", "--server", vision_server.url, "--seed", "5", "--max-new-tokens", "32", "--json",
                     "--image", str(picture), QUESTION)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr.decode()
    mine, theirs = json.loads(local.stdout), json.loads(remote.stdout)
    assert theirs["tokens"] == mine["tokens"] and theirs["text"] == mine["text"]
    assert theirs["stats"]["prompt_tokens"] == mine["stats"]["prompt_tokens"]


def test_batch_server_sends_each_records_images_from_beside_the_input(vision_server, vision_checkpoint, picture,
                                                                      tmp_path):
    source = tmp_path / "in.jsonl"
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(picture.read_bytes())
    source.write_text(json.dumps({"id": "one", "prompt": QUESTION, "image": "pics/x.png", "seed": 5}) + "\n"
                      + json.dumps({"id": "lost", "prompt": QUESTION, "image": "pics/gone.png"}) + "\n")
    done = run_cli("batch", str(source), "--server", vision_server.url, "--max-new-tokens", "32", "-q")
    out = {r["id"]: r for r in map(json.loads, done.stdout.decode().splitlines())}
    assert done.returncode == 1 and "gone.png" in out["lost"]["error"]
    answer = _client(vision_server).chat.completions.create(
        model=str(vision_checkpoint), messages=image_message(data_url(picture)), seed=5, max_tokens=32,
        extra_body={"return_token_ids": True})
    assert out["one"]["tokens"] == answer.choices[0].model_dump()["token_ids"]


NOT_BASE64 = "data:image/png;base64,%%%"  # an image part that fails as soon as anything decodes it


def test_a_text_only_model_refuses_images_before_reading_any(tiny):
    from starlette.testclient import TestClient

    engine = Engine(loaded=tiny, name="t", settings=tiny.defaults)
    with TestClient(create_app(engine), raise_server_exceptions=False) as http:
        answer = http.post("/v1/chat/completions", json={"messages": image_message(NOT_BASE64), "max_tokens": 4})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "images_unsupported"
    assert "takes no images" in answer.json()["error"]["message"]
    assert engine.processor is None and engine.admission.queued == 0


def test_more_images_than_max_images_is_a_422_before_any_is_read(strict):
    content = [{"type": "image_url", "image_url": {"url": NOT_BASE64}}] * 9 + [{"type": "text", "text": "?"}]
    answer = strict.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                       "max_tokens": 4})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "too_many_images" and "at most 8" in error["message"] and "--max-images" in error["message"]


def test_images_are_read_only_once_the_request_has_a_place_in_the_queue(vision):
    from starlette.testclient import TestClient

    engine = Engine(loaded=vision, name="v", settings=vision.defaults, exact=True, max_queue=1)
    waiting = engine.admit()  # the queue is full
    with TestClient(create_app(engine), raise_server_exceptions=False) as http:
        full = http.post("/v1/chat/completions", json={"messages": image_message(NOT_BASE64), "max_tokens": 4})
        waiting.release()
        bad = http.post("/v1/chat/completions", json={"messages": image_message(NOT_BASE64), "max_tokens": 4})
    assert full.status_code == 429  # not the 422 that reading the image gives
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_value"
    assert engine.admission.queued == 0  # the refused request gave its place back


def test_local_images_must_be_regular_files(vision, tmp_path):
    import os

    from starlette.testclient import TestClient

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    engine = Engine(loaded=vision, name="v", settings=vision.defaults, exact=True, allow_local_images=True)
    with TestClient(create_app(engine), raise_server_exceptions=False) as http:
        for path in (fifo, tmp_path):
            answer = http.post("/v1/chat/completions", json={"messages": image_message(str(path)), "max_tokens": 4})
            assert answer.status_code == 422, answer.text
            assert "is not a regular file" in answer.json()["error"]["message"]
    assert engine.admission.queued == 0


def test_a_remote_image_has_an_overall_deadline(remote, picture):
    from diffgen.server import images as server_images, wire

    (picture.parent / "big.bin").write_bytes(bytes(5 * server_images.FETCH_CHUNK))
    now = [0.0]

    def clock() -> float:  # four seconds pass on every look: the third read is past a 10 s deadline
        now[0] += 4.0
        return now[0]

    with pytest.raises(wire.ApiError) as caught:
        server_images.fetch_image(remote + "/big.bin", "messages[0].content[0]", deadline=10, clock=clock)
    assert caught.value.status == 422 and "took over 10 seconds" in caught.value.message
    assert server_images.fetch_image(remote + "/big.bin", "w") == bytes(5 * server_images.FETCH_CHUNK)


def test_serve_help_warns_what_remote_images_allow():
    done = run_cli("serve", "--help")
    text = " ".join(done.stdout.decode().replace("│", " ").split())  # Rich's box, its lines joined
    assert "any URL it can reach" in text and "--max-images" in text and "--max-steps" in text
