"""`diffgen chat`: the REPL's commands and streams (with a scripted backend), the in-process and
server backends' thought split, and the real CLI driven through a pipe, in-process on the tiny
checkpoint and against a real `diffgen serve`.
"""

from __future__ import annotations

import io
import json
import os
import re

import pytest
import torch

from conftest import run_cli
from diffgen.cli.support import chat_repl
from diffgen.cli.support.chat_repl import Chat, Repl, Reply, Streams
from diffgen.errors import DiffgenError

# -- the REPL with a scripted backend -------------------------------------------------------------------


class Scripted:
    """A backend whose answers are given: each reply yields its pieces, then ("done", Reply).

    ``script`` items: a list of (kind, text) pieces, or an exception to raise after the first piece.
    Records every call's arguments in ``calls`` and whether a reply was closed early in ``closed``.
    """

    def __init__(self, *script):
        self.script, self.calls, self.resets, self.closed = list(script), [], 0, 0

    def reset(self):
        self.resets += 1

    def reply(self, messages, *, think, seed):
        self.calls.append({"messages": [dict(m) for m in messages], "think": think, "seed": seed})
        item = self.script.pop(0) if self.script else [("answer", f"answer {len(self.calls)}")]
        try:
            if isinstance(item, BaseException):
                yield "answer", "partial"
                raise item
            for kind, text in item:
                yield kind, text
            text = "".join(t for k, t in item if k == "answer")
            thoughts = "".join(t for k, t in item if k == "thought") or None
            yield "done", Reply(text=text, thoughts=thoughts, finish_reason="stop", stats="stats line")
        except GeneratorExit:
            self.closed += 1
            raise


class InterruptedOut(io.StringIO):
    """stdout where Ctrl-C lands while a given piece is being written."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def write(self, text):
        if text == self.at:
            self.at = None
            raise KeyboardInterrupt
        return super().write(text)


def play(lines, backend, *, chat=None, dim=False, stats=False, interrupt_at=(), out=None):
    """Run the REPL over ``lines``; return (exit code, stdout, stderr, chat). A line index in
    ``interrupt_at`` raises KeyboardInterrupt at the prompt instead (Ctrl-C there)."""
    out, err = out or io.StringIO(), io.StringIO()
    chat = chat or Chat()
    feed = iter(enumerate(lines))

    def read(prompt):
        for index, line in feed:
            if index in interrupt_at:
                raise KeyboardInterrupt
            return line
        raise EOFError

    code = Repl(backend, chat, Streams(out, err, dim=dim), read, stats=stats).run()
    return code, out.getvalue(), err.getvalue(), chat


def test_turns_stream_answers_to_stdout_and_keep_the_conversation():
    backend = Scripted([("answer", "Hel"), ("answer", "lo")], [("answer", "Fine.")])
    code, out, err, chat = play(["Hi", "", "   ", "How are you?"], backend, chat=Chat(system="Be brief."))
    assert code == 0 and out == "Hello\nFine.\n" and err == ""
    assert chat.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                             {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]
    # Each turn sends the whole conversation, the system turn first.
    assert backend.calls[1]["messages"] == [{"role": "system", "content": "Be brief."}] + chat.messages[:3]


def test_thoughts_go_to_stderr_dimmed_never_to_stdout():
    backend = Scripted([("thought", "The user "), ("thought", "greets me"), ("answer", "Hello")])
    code, out, err, chat = play(["Hi"], backend, dim=True)
    assert out == "Hello\n"
    assert err == f"{chat_repl.DIM}thinking: {chat_repl.RESET}{chat_repl.DIM}The user {chat_repl.RESET}" \
                  f"{chat_repl.DIM}greets me{chat_repl.RESET}\n"
    assert chat.messages[-1] == {"role": "assistant", "content": "Hello", "reasoning_content": "The user greets me"}
    # Thoughts are kept for /save but never sent back to the model.
    play(["Hi", "Again"], backend := Scripted([("thought", "hm"), ("answer", "A")]))
    assert backend.calls[1]["messages"][1] == {"role": "assistant", "content": "A"}


def test_commands_think_system_reset_and_seeds():
    backend = Scripted()
    code, out, err, chat = play(["/think", "one", "/system Answer in French.", "two", "/system", "/reset",
                                 "three", "/think", "four"], backend, chat=Chat(seed=10))
    assert code == 0
    assert [call["think"] for call in backend.calls] == [True, True, True, False]
    assert [call["seed"] for call in backend.calls] == [10, 11, 12, 13]  # turn i gets seed + i
    assert backend.calls[1]["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert backend.calls[2]["messages"] == [{"role": "user", "content": "three"}]  # reset, no system prompt
    assert backend.resets == 1
    assert err.splitlines() == ["thinking mode on", "system prompt set (17 characters)", "system prompt removed",
                                "new conversation", "thinking mode off"]
    assert out.splitlines() == ["answer 1", "answer 2", "answer 3", "answer 4"]


def test_a_bad_command_gets_one_line_and_the_repl_goes_on():
    backend = Scripted()
    code, out, err, chat = play(["/frobnicate now", "//etc/hosts is a file", "/help", "/exit", "never read"],
                                backend)
    assert code == 0
    lines = err.splitlines()
    assert lines[0].startswith("diffgen: error: unknown command /frobnicate — /help lists the commands")
    assert "/think" in err and "/save PATH" in err  # /help
    assert backend.calls[0]["messages"] == [{"role": "user", "content": "/etc/hosts is a file"}]  # // escapes
    assert len(backend.calls) == 1  # /exit stopped the loop


def test_save_writes_the_conversation_as_json_messages_atomically(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"role": "user", "content": "an older save, longer than the new one" * 100}]))
    backend = Scripted([("thought", "t"), ("answer", "A1")], [("answer", "A2")])
    code, out, err, chat = play(["/system Sys", "Q1", "Q2", f"/save {path}"], backend)
    assert json.loads(path.read_text()) == [
        {"role": "system", "content": "Sys"}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "t"}, {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"}]
    assert f"saved 5 messages to {path}" in err
    assert os.listdir(tmp_path) == ["chat.json"]  # no temporary file left behind
    code, out, err, chat = play(["/save", f"/save {tmp_path}/missing/dir.json", "Q"], Scripted())
    assert err.splitlines()[:2] == ["diffgen: error: /save needs a file name, e.g. /save chat.json",
                                    f"diffgen: error: /save {tmp_path}/missing/dir.json: the directory "
                                    f"{tmp_path}/missing does not exist — create it first (mkdir -p {tmp_path}/missing)"]
    assert out == "answer 1\n" and code == 0


@pytest.mark.parametrize("where", ["in the generation", "while printing"])
def test_ctrl_c_during_an_answer_drops_that_turn_and_keeps_the_rest(where):
    if where == "in the generation":
        backend = Scripted([("answer", "first")], KeyboardInterrupt(), [("answer", "third")])
        out = None
    else:
        backend = Scripted([("answer", "first")], [("answer", "partial"), ("answer", "never")], [("answer", "third")])
        out = InterruptedOut(at="never")
    code, out, err, chat = play(["one", "two", "three"], backend, out=out)
    assert code == 0
    assert out == "first\npartial\nthird\n"
    assert "diffgen: interrupted; this turn was dropped" in err
    assert backend.closed == (where == "while printing")  # the reply's generator is closed, not left running
    assert [m["content"] for m in chat.messages] == ["one", "first", "three", "third"]
    assert backend.calls[2]["messages"] == [{"role": "user", "content": "one"},
                                            {"role": "assistant", "content": "first"},
                                            {"role": "user", "content": "three"}]


def test_ctrl_c_at_the_prompt_clears_the_line():
    backend = Scripted()
    code, out, err, chat = play(["typed half", "one"], backend, interrupt_at=(0,))
    assert code == 0 and out == "answer 1\n" and [c["messages"][-1]["content"] for c in backend.calls] == ["one"]


def test_a_failed_turn_gets_one_line_and_the_repl_goes_on():
    backend = Scripted(DiffgenError("the server answered 422: steps: must be a positive integer", "fix it"))
    code, out, err, chat = play(["one", "two"], backend, stats=True)
    assert code == 0
    assert "diffgen: error: the server answered 422: steps: must be a positive integer — fix it" in err
    assert [m["content"] for m in chat.messages] == ["two", "answer 2"]
    assert err.rstrip().endswith("stats line")


def test_an_unexpected_failure_in_a_turn_is_one_line_and_the_repl_goes_on(capsys, monkeypatch):
    monkeypatch.delenv("DIFFGEN_DEBUG", raising=False)
    backend = Scripted(RuntimeError("CUDA out of memory"))
    code, out, err, chat = play(["one", "two"], backend)
    assert code == 0 and out == "partial\nanswer 2\n"
    assert [m["content"] for m in chat.messages] == ["two", "answer 2"]
    line = capsys.readouterr().err.strip()
    assert line.startswith("diffgen: error: answering: RuntimeError: CUDA out of memory") and "\n" not in line


def test_the_terminal_reader_edits_lines_and_keeps_a_history(tmp_path):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    history = tmp_path / "state" / "diffgen" / "chat_history"
    with create_pipe_input() as pipe:
        read = chat_repl.terminal_reader(io.StringIO(), input=pipe, output=DummyOutput(), history=history)
        pipe.send_text("hello wrld\x1b[D\x1b[D\x1b[Do\r")  # three times left arrow, insert "o"
        assert read(">>> ") == "hello world"
        pipe.send_text("\x1b[A\r")  # up arrow: the previous line from the history
        assert read(">>> ") == "hello world"
    assert "+hello world" in history.read_text()
    assert history.stat().st_mode & 0o077 == 0  # readable by its owner only


def test_the_history_lives_in_the_users_state_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert chat_repl.history_path() == tmp_path / "diffgen" / "chat_history"


# -- the backends' thought split (scripted canvases) ----------------------------------------------------


def _thinking_canvases(tokenizer):
    thought = tokenizer("<|channel>thought\nThe user greets me", add_special_tokens=False)["input_ids"]
    answer = tokenizer("<channel|>Hello there", add_special_tokens=False)["input_ids"] + [1]
    return [thought, answer]


class ScriptedGeneration:
    """A generation that commits given canvases (the routing under test, not the sampler)."""

    def __init__(self, tokenizer, canvases, settings):
        self.tokenizer, self.canvases, self.settings = tokenizer, canvases, settings

    def __iter__(self):
        from diffgen.denoise import loop

        for index, tokens in enumerate(self.canvases):
            yield loop.CanvasEvent(canvas=index, canvases=len(self.canvases), tokens=torch.tensor([tokens]), steps=1,
                                   finished=torch.tensor([False]), elapsed=0.0)

    @property
    def result(self):
        from diffgen.denoise import loop
        from diffgen.denoise.channels import split_response

        ids = [t for canvas in self.canvases for t in canvas][:-1]
        response = split_response(self.tokenizer, ids)
        stats = loop.CompletionStats(prompt_tokens=1, new_tokens=len(ids), canvases=len(self.canvases),
                                     steps_per_canvas=(1,) * len(self.canvases), tokens_per_forward=1.0, seconds=1.0,
                                     tokens_per_second=1.0, peak_memory_bytes=None)
        return loop.GenerationResult((loop.Completion(response.text, response.thoughts, tuple(ids), "eos", stats),),
                                     self.settings)


def test_in_process_thoughts_and_answer_arrive_apart_canvas_by_canvas(tiny, monkeypatch):
    from diffgen.cli.chat import LocalChat
    from diffgen.denoise import loop

    canvases = _thinking_canvases(tiny.tokenizer)
    monkeypatch.setattr(loop, "stream", lambda loaded, prompts, settings, **kw: ScriptedGeneration(
        tiny.tokenizer, canvases, settings))
    pieces = list(LocalChat(tiny, tiny.defaults.replace(max_new_tokens=64)).reply(
        [{"role": "user", "content": "Hi"}], think=True, seed=1))
    streamed = [(kind, value) for kind, value in pieces if kind != "done" and value]
    assert streamed == [("thought", "The user greets me"), ("answer", "Hello there")]
    assert pieces[-1][1].text == "Hello there" and pieces[-1][1].thoughts == "The user greets me"


def test_server_thoughts_arrive_as_reasoning_content_apart_from_the_answer(tiny, monkeypatch):
    from starlette.testclient import TestClient

    from diffgen.cli.support.chat_client import RemoteChat
    from diffgen.denoise import loop
    from diffgen.server.app import Engine, create_app

    canvases = _thinking_canvases(tiny.tokenizer)
    monkeypatch.setattr(loop, "stream", lambda loaded, prompts, settings, **kw: ScriptedGeneration(
        tiny.tokenizer, canvases, settings))
    with TestClient(create_app(Engine(tiny, "tiny", tiny.defaults))) as http:
        backend = RemoteChat("http://testserver/v1", client=http, fields={"max_tokens": 64})
        pieces = list(backend.reply([{"role": "user", "content": "Hi"}], think=True, seed=1))
    streamed = [(kind, value) for kind, value in pieces if kind != "done"]
    assert streamed == [("thought", "The user greets me"), ("answer", "Hello there")]
    assert pieces[-1][1] == Reply(text="Hello there", thoughts="The user greets me", finish_reason="stop")


# -- the real CLI through a pipe ------------------------------------------------------------------------

SCRIPT = ["Why is the sky blue?", "/think", "And sunsets?", "/nonsense", "/system Be brief.", "Once more.",
          "/save {save}", "/reset", "New topic."]
FLAGS = ["-n", "32", "--steps", "4"]


def _chat(*args, script, tmp_path, name, env=None):
    save = tmp_path / f"{name}.json"
    text = "\n".join(line.format(save=save) for line in script) + "\n"
    done = run_cli("chat", *args, input=text.encode(), env=env)
    return done, (json.loads(save.read_text()) if save.exists() else None)


def test_chat_through_a_pipe_in_process(tiny_checkpoint, tmp_path):
    done, saved = _chat("-m", str(tiny_checkpoint), "--seed", "7", "--stats", *FLAGS, script=SCRIPT,
                        tmp_path=tmp_path, name="a")
    assert done.returncode == 0, done.stderr.decode()
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert stderr.count(" reused from the cache") == 4  # four turns, one --stats line each
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert saved[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in saved if m["role"] == "user"] == ["Why is the sky blue?", "And sunsets?",
                                                                    "Once more."]
    # stdout: each answer as it was streamed, then a newline; the saved turns are the same text.
    assert stdout.startswith("".join(m["content"] + "\n" for m in saved if m["role"] == "assistant"))
    assert stderr.count("diffgen: error: unknown command /nonsense") == 1
    assert "thinking mode on" in stderr and "new conversation" in stderr
    # The KV cache is reused from the second turn on, and started anew after /reset.
    reused = [int(n) for n in re.findall(r"(\d+) reused from the cache", stderr)]
    assert reused[0] == 0 and reused[1] > 0 and reused[3] == 0

    # The first turn is `diffgen run` with the same seed; the whole chat is reproducible.
    run = run_cli("run", "-m", str(tiny_checkpoint), "--seed", "7", *FLAGS, "-q", "--no-stdin", SCRIPT[0])
    assert run.returncode == 0 and stdout.startswith(run.stdout.decode()) and saved[2]["content"] + "\n" == \
        run.stdout.decode()
    again, saved_again = _chat("-m", str(tiny_checkpoint), "--seed", "7", *FLAGS, script=SCRIPT, tmp_path=tmp_path,
                               name="b")
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout == done.stdout and saved_again == saved


def test_chat_against_a_server_matches_the_in_process_chat(server, tiny_checkpoint, tmp_path):
    """The server encodes the whole conversation each turn, as the in-process chat does with
    --no-reuse: with the same seeds, the same answers token for token."""
    local, saved_local = _chat("-m", str(tiny_checkpoint), "--seed", "3", "--no-reuse", *FLAGS, script=SCRIPT,
                               tmp_path=tmp_path, name="local")
    remote, saved_remote = _chat("--seed", "3", *FLAGS, script=SCRIPT, tmp_path=tmp_path, name="remote",
                                 env={"DIFFGEN_SERVER": server.url})
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr.decode()
    assert remote.stdout == local.stdout and len(remote.stdout) > 4
    assert saved_remote == saved_local
    assert remote.stderr.decode().count("unknown command /nonsense") == 1
    assert f"at {server.url}" in remote.stderr.decode()


def test_server_errors_are_one_line_per_turn_and_the_repl_goes_on(server, tiny_checkpoint, tmp_path):
    refused, _ = _chat("--server", server.url + "/v1", "-m", "no-such-model", script=["Hi", "Hi again"],
                       tmp_path=tmp_path, name="refused")
    assert refused.returncode == 0 and refused.stdout == b""
    errors = [line for line in refused.stderr.decode().splitlines() if line.startswith("diffgen: error:")]
    assert len(errors) == 2 and "HTTP 404" in errors[0] and "no-such-model" in errors[0]

    from conftest import free_port

    unreachable, _ = _chat("--server", f"http://127.0.0.1:{free_port()}", script=["Hi"], tmp_path=tmp_path,
                           name="unreachable")
    assert unreachable.returncode == 0
    assert "diffgen: error: cannot reach the server at http://127.0.0.1:" in unreachable.stderr.decode()
    assert "diffgen serve" in unreachable.stderr.decode()

    local_flag = run_cli("chat", "--server", server.url, "--device", "cpu", input=b"")
    assert local_flag.returncode == 2 and "--device applies to an in-process model" in local_flag.stderr.decode()
    key_alone = run_cli("chat", "-m", str(tiny_checkpoint), "--api-key", "k", input=b"")
    assert key_alone.returncode == 2 and "--api-key is sent to a server: it needs --server" in key_alone.stderr.decode()


def test_chat_help_has_examples_and_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from diffgen.cli.app import app\n"
            "result = CliRunner().invoke(app, ['chat', '--help'])\n"
            "assert result.exit_code == 0, result.output\n"
            "assert 'Examples' in result.output and '/think' in result.output and 'no per-conversation cache' in "
            "' '.join(result.output.split()), result.output\n"
            "print(sorted(m for m in ('torch', 'transformers', 'prompt_toolkit', 'httpx', 'platformdirs') "
            "if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_real_sigint_stops_an_answer_but_not_the_chat_between_turns():
    """SIGINT (Ctrl-C on a terminal in cooked mode) interrupts an answer that is streaming; one that
    arrives between an answer and the next prompt has nothing to stop and must not end the chat."""
    import signal

    class Signalling(Scripted):
        def reply(self, messages, *, think, seed):
            yield "answer", "partial"
            if len(self.calls) == 0:
                self.calls.append(None)
                os.kill(os.getpid(), signal.SIGINT)
                yield "answer", "never"
            yield "done", Reply(text="whole", thoughts=None, finish_reason="stop")

    lines = iter(["one", "two"])

    def read_or_eof(prompt):
        os.kill(os.getpid(), signal.SIGINT)  # before the line is read: not during an answer
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    chat = Chat()
    before = signal.getsignal(signal.SIGINT)
    assert Repl(Signalling(), chat, Streams(out, err, dim=False), read_or_eof).run() == 0
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert out.getvalue() == "partial\npartial\n"
    assert err.getvalue().count("interrupted; this turn was dropped") == 1
    assert [m["content"] for m in chat.messages] == ["two", "whole"]
