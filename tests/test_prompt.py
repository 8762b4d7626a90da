"""Prompt composition (argument, stdin, files) and tokenisation through the chat template."""

import io

import pytest

from diffgen.errors import UsageError
from diffgen.prompt import compose, encode, read_stdin


def test_argument_alone():
    assert compose("Why?", None).text == "Why?"


@pytest.mark.parametrize("argument", [None, "-"])
def test_stdin_alone(argument):
    assert compose(argument, b"notes here\n\n").text == "notes here"


def test_stdin_then_blank_line_then_argument():
    assert compose("Summarise this", b"line one\nline two  \n\n").text == "line one\nline two\n\nSummarise this"


def test_files_come_after_stdin_and_before_the_argument(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("file A\n")
    b = tmp_path / "b.txt"
    b.write_text("file B")
    assert compose("Q", b"stdin", [a, b]).text == f"stdin\n\n--- {a} ---\nfile A\n\n--- {b} ---\nfile B\n\nQ"


def test_each_file_is_pasted_under_its_name_so_the_model_can_tell_them_apart(tmp_path):
    a, b, empty = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "empty.txt"
    a.write_text("x = 1\n")
    b.write_text("x = 2\n")
    empty.write_text("")
    composed = compose("What differs?", None, [a, b, empty])
    assert composed.text.splitlines() == [f"--- {a} ---", "x = 1", "", f"--- {b} ---", "x = 2", "", "What differs?"]
    assert composed.warnings == (f"--file {empty} is empty; it was left out",)


def test_empty_everything_is_a_usage_error():
    with pytest.raises(UsageError):
        compose(None, b"   \n")
    with pytest.raises(UsageError):
        compose("  ", None)


def test_invalid_utf8_is_replaced_with_a_warning():
    composed = compose(None, b"caf\xe9 ok")
    assert composed.text == "caf\ufffd ok"
    assert composed.warnings and "UTF-8" in composed.warnings[0]


def test_unreadable_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        compose("x", None, [tmp_path / "missing.txt"])


def test_read_stdin_ignores_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert read_stdin(Tty("typed")) is None
    assert read_stdin(None) is None
    assert read_stdin(io.TextIOWrapper(io.BytesIO(b"piped"))) == b"piped"


def _render(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_chat_template_without_thinking_opens_an_empty_thought_channel(tiny):
    text = _render(tiny.tokenizer, encode(tiny.tokenizer, "Why is the sky blue?"))
    assert text == "<bos><|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


def test_chat_template_with_thinking_and_system(tiny):
    text = _render(tiny.tokenizer, encode(tiny.tokenizer, "Q", system="Be brief.", think=True))
    assert text == "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\nQ<turn|>\n<|turn>model\n"


def test_raw_tokenises_the_text_as_is(tiny):
    ids = encode(tiny.tokenizer, "plain text 日本 🎉", raw=True)
    assert _render(tiny.tokenizer, ids) == "<bos>plain text 日本 🎉"


def test_raw_with_system_is_refused(tiny):
    with pytest.raises(UsageError):
        encode(tiny.tokenizer, "x", system="s", raw=True)
