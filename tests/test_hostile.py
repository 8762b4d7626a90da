"""Hostile inputs (issue 20): nothing lost, nothing crashes.

The parametrised suite runs every bad input of the issue that is refused before a model's weights
are read, in process: each case is the command line, what goes on stdin, the exit code, words the
one ``diffgen: error:`` line must hold, and the files that must come out unchanged. The cases that
need a generation (a full disk, a trace that cannot be written, the lock, the server) follow it,
each on the tiny checkpoints of ``conftest.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffgen.cli.app import app
from tests.conftest import cli, run_cli, write_image

runner = CliRunner()

TRACE = (json.dumps({"type": "header", "version": 1, "model": "m", "prompt": "p", "settings": {}, "canvas_length": 4,
                     "channel_ids": None}) + "\n"
         + json.dumps({"type": "result", "text": "t", "thoughts": "", "finish_reason": "length", "stats": {}}) + "\n")
NESTED = "{\"type\":\"array\",\"maxItems\":1,\"items\":" * 200 + "{\"type\":\"null\"}" + "}" * 200
NESTED_40 = "{\"type\":\"array\",\"maxItems\":1,\"items\":" * 40 + "{\"type\":\"null\"}" + "}" * 40


@pytest.fixture
def area(tmp_path, tiny_checkpoint, vision_checkpoint, monkeypatch):
    """A working directory with a user's files (a trace, notes, prompts, schemas) and broken
    copies of the tiny checkpoint; returns the substitutions for the cases' ``{name}`` fields."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.jsonl").write_text(TRACE)
    (tmp_path / "notes.txt").write_text("my notes, not a trace\n")
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 {{~old~}} cr\xe8me\n".encode("latin-1"))
    (tmp_path / "out.jsonl.settings.json").write_text("my own settings\n")
    schemas = {"minmax": {"type": "integer", "minimum": 10, "maximum": 1}, "noenum": {"enum": []},
               "nointeger": {"type": "integer", "minimum": 1.5, "maximum": 1.7},
               "items": {"type": "array", "minItems": 5, "maxItems": 2, "items": {"type": "null"}},
               "huge": {"type": "array", "maxItems": 64, "items": {"type": "array", "maxItems": 64,
                                                                  "items": {"type": "string"}}}}
    for name, schema in schemas.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(schema))
    (tmp_path / "nan.json").write_text('{"type": "integer", "maximum": NaN}')
    (tmp_path / "deep.json").write_text(NESTED)
    broken = {}
    for name in ("notok", "badtok", "badtpl"):
        broken[name] = shutil.copytree(tiny_checkpoint, tmp_path / name)
    (broken["notok"] / "tokenizer.json").unlink()
    (broken["badtok"] / "tokenizer.json").write_text('{"broken')
    (broken["badtpl"] / "chat_template.jinja").write_text("{% if %}")
    write_image(tmp_path / "wide.png", width=2000, height=3)
    return {"ckpt": str(tiny_checkpoint), "vision": str(vision_checkpoint), "tmp": str(tmp_path)}


def snapshot(paths):
    return {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).exists() else None
            for path in paths}


# (case id, arguments, stdin, exit code, words on stderr, files unchanged). {ckpt}: the tiny checkpoint.
CASES = [
    # 1. no user file is destroyed
    ("replay-svg-onto-its-trace", ["replay", "good.jsonl", "--svg", "good.jsonl"], None, 2,
     ["--svg good.jsonl is an input"], ["good.jsonl"]),
    ("replay-html-onto-its-trace", ["replay", "good.jsonl", "--html", "./good.jsonl"], None, 2,
     ["is an input"], ["good.jsonl"]),
    ("replay-svg-onto-notes", ["replay", "good.jsonl", "--svg", "notes.txt"], None, 2,
     ["already exists and is not a picture diffgen wrote", "--overwrite"], ["notes.txt", "good.jsonl"]),
    ("replay-svg-and-html-one-file", ["replay", "good.jsonl", "--svg", "a.out", "--html", "a.out"], None, 2,
     ["name the same file"], ["good.jsonl"]),
    ("trace-onto-its-input", ["run", "-m", "{ckpt}", "--trace", "notes.txt", "-f", "notes.txt", "x"], None, 2,
     ["--trace notes.txt is an input"], ["notes.txt"]),
    ("trace-onto-notes", ["run", "-m", "{ckpt}", "--trace", "notes.txt", "x"], None, 2,
     ["already exists and is not a diffgen trace", "--overwrite"], ["notes.txt"]),
    ("trace-onto-schema", ["run", "-m", "{ckpt}", "--trace", "minmax.json", "--schema", "minmax.json", "x"], None, 2,
     ["is an input"], ["minmax.json"]),
    ("fill-trace-onto-notes", ["fill", "-m", "{ckpt}", "--trace", "notes.txt", "a {{}} b"], None, 2,
     ["not a diffgen trace"], ["notes.txt"]),
    ("edit-trace-onto-its-file", ["edit", "-m", "{ckpt}", "--trace", "notes.txt", "notes.txt", "x"], None, 2,
     ["is an input"], ["notes.txt"]),
    ("batch-onto-its-input", ["batch", "-m", "{ckpt}", "p.txt", "-o", "p.txt"], None, 2,
     ["input file itself"], ["p.txt"]),
    ("batch-onto-its-schema", ["batch", "-m", "{ckpt}", "p.txt", "-o", "minmax.json", "--overwrite", "--schema",
                               "minmax.json"], None, 2, ["-o minmax.json is an input"], ["minmax.json"]),
    ("batch-settings-file-not-ours", ["batch", "-m", "{ckpt}", "p.txt", "-o", "out.jsonl"], None, 2,
     ["out.jsonl.settings.json already exists and is not a diffgen settings file"], ["out.jsonl.settings.json"]),
    # 3. memory stays bounded
    ("file-dev-zero", ["run", "-m", "{ckpt}", "-f", "/dev/zero", "x"], None, 1,
     ["--file /dev/zero holds more than 64 MiB"], []),
    ("stdin-endless", ["run", "-m", "{ckpt}", "x"], b"\0" * ((64 << 20) + 1), 1, ["stdin holds more than 64 MiB"], []),
    ("stdin-beyond-context", ["run", "-m", "{ckpt}", "x"], b"word " * 400_000, 1,
     ["the prompt is 2,000,00", "more than the model's context of 4,096"], []),
    # 4. JSON valid by construction
    ("schema-min-above-max", ["run", "-m", "{ckpt}", "--schema", "minmax.json", "x"], None, 2,
     ["minimum 10 above maximum 1"], []),
    ("schema-empty-enum", ["run", "-m", "{ckpt}", "--schema", "noenum.json", "x"], None, 2, ["empty enum"], []),
    ("schema-no-integer", ["run", "-m", "{ckpt}", "--schema", "nointeger.json", "x"], None, 2,
     ["no integer lies between"], []),
    ("schema-min-items", ["run", "-m", "{ckpt}", "--schema", "items.json", "x"], None, 2,
     ["minItems 5 above maxItems 2"], []),
    ("schema-nan", ["run", "-m", "{ckpt}", "--schema", "nan.json", "x"], None, 2, ["NaN is not a JSON number"], []),
    ("schema-200-deep", ["run", "-m", "{ckpt}", "--schema", "deep.json", "x"], None, 2, ["nests more than the 32"], []),
    ("schema-too-large", ["run", "-m", "{ckpt}", "--schema", "huge.json", "x"], None, 2,
     ["positions, more than the 8,192"], []),
    # 5. ordinary situations are not bugs
    ("no-tokenizer-json", ["run", "-m", "{tmp}/notok", "x"], None, 1, ["notok has no tokenizer.json"], []),
    ("broken-tokenizer-json", ["run", "-m", "{tmp}/badtok", "x"], None, 1,
     ["badtok/tokenizer.json cannot be read", "damaged"], []),
    ("template-syntax-error", ["run", "-m", "{tmp}/badtpl", "x"], None, 1,
     ["badtpl/chat_template.jinja has a syntax error on line 1", "--raw"], []),
    ("argument-not-utf8", ["run", "-m", "{ckpt}", "caf\udce9"], None, 2, ["PROMPT is not valid UTF-8", "0xe9"], []),
    ("system-not-utf8", ["run", "-m", "{ckpt}", "-s", "\udcff", "x"], None, 2, ["--system is not valid UTF-8"], []),
    ("image-too-wide", ["run", "-m", "{vision}", "--image", "wide.png", "x"], None, 1,
     ["wide.png (2000 x 3) is too wide", "crop it"], []),
    # 7. every limit checked before weights are read
    ("steps-a-billion", ["run", "-m", "{ckpt}", "--steps", "1000000000", "x"], None, 2, ["from 1 to 1024"], []),
    ("batch-max-new-tokens", ["batch", "-m", "{ckpt}", "p.txt", "--max-new-tokens", "1000000000000"], None, 2,
     ["--max-new-tokens 1000000000000 needs", "more than the model's context of 4,096"], []),
    ("chat-max-new-tokens", ["chat", "-m", "{ckpt}", "--max-new-tokens", "5000"], b"hi\n", 2,
     ["model's context of 4,096"], []),
    ("info-context-huge", ["info", "-m", "{ckpt}", "--context", "99999999999"], None, 2, ["--context"], []),
    ("info-context-beyond-model", ["info", "-m", "{ckpt}", "--context", "9999"], None, 2,
     ["--context 9999 is more than the model's context of 4096"], []),
    # 8. smaller
    ("edit-latin1", ["edit", "-m", "{ckpt}", "latin1.txt", "x"], None, 2, ["latin1.txt is not UTF-8", "iconv"],
     ["latin1.txt"]),
    ("model-empty", ["run", "-m", "", "x"], None, 2, ["must name a checkpoint"], []),
    ("pull-empty", ["pull", ""], None, 2, ["must name a checkpoint"], []),
    ("api-key-blank", ["serve", "-m", "{ckpt}", "--host", "0.0.0.0", "--api-key", " "], None, 2, ["blank"], []),
]


@pytest.mark.parametrize("args, stdin, code, words, unchanged", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_hostile_input_is_one_line_and_touches_nothing(area, args, stdin, code, words, unchanged):
    args = [arg.format(**area) if "{" in arg and "}" in arg and "{{" not in arg else arg for arg in args]
    before = snapshot(unchanged)
    listing = sorted(os.listdir(area["tmp"]))
    result = runner.invoke(app, args, input=stdin)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("diffgen: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert "this is a bug" not in result.stderr
    assert snapshot(unchanged) == before
    assert sorted(os.listdir(area["tmp"])) == listing  # no temporary or lock file left behind


def test_diffgen_config_naming_nothing_is_a_warning(area, tmp_path):
    for where, what in ((tmp_path / "missing.toml", "missing"), (tmp_path, "a directory")):
        result = runner.invoke(app, ["run", "-m", area["ckpt"], "--steps", "0", "x"],
                               env={"DIFFGEN_CONFIG": str(where)})
        assert result.exit_code == 2
        assert f"diffgen: warning: DIFFGEN_CONFIG names {where}, which is {what}" in result.stderr


def test_run_help_shows_the_images_extra():
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "pip install 'diffgen[images]'" in result.stdout


def test_info_plans_images_with_the_checkpoints_own_soft_tokens(vision_checkpoint):
    result = runner.invoke(app, ["info", "-m", str(vision_checkpoint), "--images", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["image_tokens"] == 4 * (70 + 2)  # processor_config.json: max_soft_tokens 70
    assert data["context"] == 4096 - 4 * 72  # no --context given: the default, within the model's context
    refused = runner.invoke(app, ["info", "-m", str(vision_checkpoint), "--images", "100"])
    assert refused.exit_code == 2 and "--context" not in refused.stderr and "fill the model's context" in refused.stderr


# -- item 1 and 5: outputs replaced whole, or not at all -----------------------------------------------


def test_trace_replaces_a_trace_and_overwrite_replaces_anything(tiny_checkpoint, tmp_path):
    trace, notes = tmp_path / "t.jsonl", tmp_path / "notes.txt"
    trace.write_text(TRACE)
    notes.write_text("mine\n")
    for target, extra in ((trace, []), (notes, ["--overwrite"])):
        done = cli("run", "-q", "-m", str(tiny_checkpoint), "--seed", "1", "--max-new-tokens", "4", "--steps", "2",
                   "--trace", str(target), *extra, "Hi")
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in target.read_text().splitlines()]
        assert lines[0]["type"] == "header" and lines[-1]["type"] == "result" and len(lines) > 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "t.jsonl"]


def test_a_full_stdout_is_one_line(tiny_checkpoint):
    done = run_cli(shell=f"{sys.executable} -m diffgen run -q -m {tiny_checkpoint} --max-new-tokens 4 --steps 2 Hi "
                         "> /dev/full")
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines() == [
        "diffgen: error: writing the answer to stdout: No space left on device — free some space on that disk, "
        "or write somewhere else"]


def test_a_trace_that_cannot_be_written_still_prints_the_answer(tiny_checkpoint, tmp_path):
    """The file system refuses the trace (here: a file size limit, as a full disk would): the answer
    is printed, the old trace stays whole, no temporary file is left, and the error is one line."""
    old = tmp_path / "t.jsonl"
    old.write_text(TRACE)
    common = f"-m {tiny_checkpoint} --seed 3 --max-new-tokens 4 --steps 2"
    expected = cli("run", "-q", *common.split(), "Hi").stdout
    done = run_cli(shell=f"ulimit -f 2; cd {tmp_path} && {sys.executable} -m diffgen run -q {common} "
                         "--trace t.jsonl Hi")
    assert done.returncode == 1
    assert done.stdout == expected and expected.strip()
    assert done.stderr.decode().strip().splitlines() == [
        "diffgen: error: cannot write --trace t.jsonl: File too large — the file grew past the size this system "
        "allows; write somewhere else"]
    assert old.read_text() == TRACE
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]


def test_a_full_disk_for_the_trace_still_prints_the_answer(tiny_checkpoint):
    common = ["-m", str(tiny_checkpoint), "--seed", "3", "--max-new-tokens", "4", "--steps", "2"]
    expected = cli("run", "-q", *common, "Hi").stdout
    done = cli("run", "-q", *common, "--trace", "/dev/full", "Hi")
    assert done.returncode == 1
    assert done.stdout == expected and expected.strip()
    assert done.stderr.decode().strip().splitlines() == [
        "diffgen: error: cannot write --trace /dev/full: No space left on device — free some space on that disk, "
        "or write somewhere else"]


def test_a_picture_that_cannot_be_written_leaves_nothing_half_written(tmp_path):
    from diffgen.outputs import OutputError, write_text

    target = tmp_path / "p.svg"
    target.write_text("<svg>old</svg>")
    done = subprocess.run([sys.executable, "-c", f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
from diffgen.outputs import write_text
write_text({str(target)!r}, "x" * 5000, "--svg")
"""], capture_output=True, text=True)
    assert "OutputError: cannot write --svg" in done.stderr and "File too large" in done.stderr
    assert target.read_text() == "<svg>old</svg>"
    assert [p.name for p in tmp_path.iterdir()] == ["p.svg"]
    write_text(target, "<svg>new</svg>")
    assert target.read_text() == "<svg>new</svg>"
    assert OutputError.exit_code == 1


def test_chat_save_refuses_a_file_that_is_not_a_saved_conversation(tmp_path):
    import io

    from diffgen.cli.support.chat_repl import Chat, Repl, Streams

    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    err = io.StringIO()
    repl = Repl(None, Chat(), Streams(io.StringIO(), err, dim=False), lambda prompt: "")
    repl.save(str(notes))
    assert notes.read_text() == "mine\n"
    assert "/save" in err.getvalue() and "is not a conversation /save wrote" in err.getvalue()
    saved = tmp_path / "chat.json"
    repl.save(str(saved))
    repl.save(str(saved))  # its own file: replaced
    assert json.loads(saved.read_text()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "notes.txt"]


# -- item 2: one writer at a time ------------------------------------------------------------------


def test_a_second_batch_writer_is_refused_with_the_holders_pid(tiny_checkpoint, tmp_path):
    from diffgen import outputs

    prompts, out = tmp_path / "p.txt", tmp_path / "out.jsonl"
    prompts.write_text("one\ntwo\n")
    with outputs.lock(out, "-o"):  # this process is the first writer
        for extra in ([], ["--resume"], ["--overwrite"]):
            done = run_cli("batch", "-m", str(tiny_checkpoint), str(prompts), "-o", str(out), *extra)
            assert done.returncode == 1, done.stderr
            line = done.stderr.decode().strip()
            assert line == (f"diffgen: error: -o {out} is being written by process {os.getpid()} (diffgen holds "
                            f"{outputs.lock_path(out)}) — wait for it to finish, or write to another file")
            assert not out.exists()
    done = cli("batch", "-q", "-m", str(tiny_checkpoint), str(prompts), "-o", str(out), "--max-new-tokens", "4",
               "--steps", "2")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [1, 2]
    assert not outputs.lock_path(out).exists()


def test_the_lock_survives_a_holder_that_removes_the_file_under_a_waiter(tmp_path):
    """The lock file is removed when released; a lock taken on a removed file is taken again."""
    from diffgen import outputs

    out = tmp_path / "o.jsonl"
    with outputs.lock(out):
        assert outputs.lock_path(out).read_text().strip() == str(os.getpid())
        with pytest.raises(outputs.OutputLockedError):
            with outputs.lock(out):
                pass
    with outputs.lock(out):
        pass
    assert list(tmp_path.iterdir()) == []


# -- item 4: JSON valid by construction --------------------------------------------------------------


def test_a_string_with_max_length_zero_is_the_empty_string(tiny_checkpoint, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string", "maxLength": 0},
                                                                    "b": {"type": "integer", "minimum": -3,
                                                                          "maximum": 7}},
                                  "required": ["a", "b"], "additionalProperties": False}))
    done = cli("run", "-q", "-m", str(tiny_checkpoint), "--seed", "1", "--schema", str(schema), "Hi")
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert value["a"] == "" and -3 <= value["b"] <= 7


def test_a_schema_without_numbers_needs_no_digit_tokens(tiny):
    from diffgen.denoise.constrained import schema as schema_mod
    from diffgen.errors import UsageError

    vocab = schema_mod.vocabulary(tiny.tokenizer, len(tiny.tokenizer), 0)
    no_digits = schema_mod.Vocabulary(vocab.size, vocab.pad, vocab.string, (), vocab.minus, vocab.point)
    plan = schema_mod.layout({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3},
                                                               "b": {"type": "boolean"}},
                              "required": ["a", "b"], "additionalProperties": False}, tiny.tokenizer, no_digits, 16)
    assert len(plan.spans) == 2
    with pytest.raises(UsageError, match="no single-digit tokens, so the integer at / cannot"):
        schema_mod.layout({"type": "integer"}, tiny.tokenizer, no_digits, 16)


# -- item 6: the server never answers 5xx to a request body ------------------------------------------


@pytest.fixture
def http(tiny):
    from starlette.testclient import TestClient

    from diffgen.server.app import Engine, create_app

    with TestClient(create_app(Engine(loaded=tiny, name="tiny", settings=tiny.defaults, exact=True)),
                    raise_server_exceptions=False) as client:
        yield client


CHAT = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "steps": 2'
BODIES = [
    ("nested-arrays", "[" * 100_000 + "]" * 100_000, 400, "nests deeper"),
    ("nested-in-a-field", CHAT + ', "user_data": ' + "[" * 70 + "]" * 70 + "}", 400, "nests deeper than 64"),
    ("lone-surrogate", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "messages[0].content: a lone surrogate"),
    ("lone-surrogate-key", '{"\\udfff": 1, "messages": [{"role": "user", "content": "hi"}]}', 400, "lone surrogate"),
    ("nan", CHAT + ', "t_max": NaN}', 400, "NaN is not a JSON value"),
    ("huge-integer", CHAT + ', "seed": ' + "9" * 5000 + "}", 400, "not valid JSON"),
    ("not-utf8", b'{"messages": "\xff"}', 400, "not valid JSON"),
    ("temperature-hot", CHAT + ', "temperature": "hot"}', 422, "temperature: must be a number"),
    ("top-p-list", CHAT + ', "top_p": [1]}', 422, "top_p: must be a number"),
    ("user-number", CHAT + ', "user": 5}', 422, "user: must be a string"),
    ("schema-200-deep", CHAT + ', "response_format": {"type": "json_schema", "json_schema": {"schema": '
     + NESTED + "}}}", 400, "nests deeper than 64"),
    ("schema-40-deep", CHAT + ', "response_format": {"type": "json_schema", "json_schema": {"schema": '
     + NESTED_40 + "}}}", 422, "nests more than the 32"),
    ("schema-min-above-max", CHAT + ', "response_format": {"type": "json_schema", "json_schema": {"schema": '
     '{"type": "integer", "minimum": 10, "maximum": 1}}}}', 422, "minimum 10 above maximum 1"),
    ("schema-max-length-zero", CHAT + ', "response_format": {"type": "json_schema", "json_schema": {"schema": '
     '{"type": "string", "maxLength": 0}}}}', 200, ""),
]


@pytest.mark.parametrize("body, status, words", [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_the_server_answers_every_body_without_a_5xx(http, body, status, words):
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["choices"][0]["message"]["content"] == '""'
    else:
        assert words in response.json()["error"]["message"]


def test_models_lists_the_fields_that_have_no_effect(http):
    card = http.get("/v1/models").json()["data"][0]
    assert {"temperature", "top_p"} <= set(card["diffgen_ignored_fields"])
    assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                                   "steps": 2, "temperature": 0.2}).status_code == 200


def test_a_failure_in_a_route_is_a_500_object_not_a_dropped_connection(tiny):
    """Starlette's last-resort handler answers and then re-raises, and uvicorn closes the keep-alive
    connection; the middleware answers and does not re-raise."""
    from starlette.testclient import TestClient

    from diffgen.server.app import ContainFailures, Engine, create_app

    async def broken(scope, receive, send):  # a route that fails before it answers
        raise RuntimeError("boom")

    client = TestClient(ContainFailures(broken), raise_server_exceptions=True)  # a re-raise would fail here
    response = client.get("/x")
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "the server failed: RuntimeError; see the server's log"
    # and diffgen's app has it, inside Starlette's last-resort handler (which would otherwise re-raise)
    app = create_app(Engine(loaded=tiny, name="tiny", settings=tiny.defaults))
    assert [entry.cls for entry in app.user_middleware] == [ContainFailures]


def test_serve_on_a_busy_port_says_so_before_loading(tiny_checkpoint):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", "-m", "/nonexistent/checkpoint", "--port", str(port)])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"diffgen: error: cannot listen on 127.0.0.1:{port}: Address already in use — "
                                     "another program is listening there: stop it, or pick another port with --port")


# -- item 5: chat stdin, and item 8's smaller ones -----------------------------------------------------


def test_chat_stdin_that_is_not_utf8_is_replaced_with_a_warning(tiny_checkpoint):
    done = run_cli("chat", "-q", "-m", str(tiny_checkpoint), "--max-new-tokens", "4", "--steps", "2",
                   input=b"hi\n\xff\xfe there\n")
    assert done.returncode == 0, done.stderr
    assert "diffgen: warning: line 2 of stdin is not valid UTF-8; invalid bytes were replaced by U+FFFD" in \
        done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()


def test_offload_on_the_cpu_says_it_does_nothing(tiny_checkpoint):
    done = cli("run", "-m", str(tiny_checkpoint), "--offload", "--max-new-tokens", "4", "--steps", "2", "Hi")
    assert done.returncode == 0
    assert "diffgen: warning: --offload has no effect: the model runs on the CPU" in done.stderr.decode()


def test_a_batch_record_seed_is_checked_like_the_flag():
    from diffgen.records import batch

    (item,) = batch.parse(['{"id": 1, "prompt": "x", "seed": -3}'], "jsonl")
    assert isinstance(item, batch.InputError)
    assert item.message == "field 'seed' must be an integer from 0 to 2**63-1 = 9223372036854775807 (got -3)"
    (item,) = batch.parse(['{"id": 1, "prompt": "x", "steps": 5000}'], "jsonl")
    assert "from 1 to 1024" in item.message


def test_word_level_tokenizers_keep_their_spaces_in_the_step_view():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from diffgen.records.trace import TokenTexts

    words = ["[UNK]", "[PAD]", "hello", "world", "again"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    ids = tokenizer("hello world again")["input_ids"]
    assert "".join(TokenTexts(tokenizer).texts(ids)) == tokenizer.decode(ids) == "hello world again"


def test_byte_level_tokenizers_are_drawn_as_before(tiny):
    from diffgen.records.trace import TokenTexts

    ids = tiny.tokenizer("hello world again", add_special_tokens=False)["input_ids"]
    assert "".join(TokenTexts(tiny.tokenizer).texts(ids)) == "hello world again"


def test_a_full_disk_under_batch_names_the_output_and_resume_finishes_it(tiny_checkpoint, tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "out.jsonl"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    common = f"{sys.executable} -m diffgen batch -q -m {tiny_checkpoint} {prompts} -o {out} --max-new-tokens 4 " \
             "--steps 2 --batch-size 1"
    done = run_cli(shell=f"ulimit -f 2; {common}")  # the output may not pass 2 KiB, as on a full disk
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines()[-1] == (
        f"diffgen: error: cannot write -o {out}: File too large — the file grew past the size this system allows; "
        "write somewhere else")
    done = run_cli(shell=f"{common} --resume")
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == list(range(1, 7))
