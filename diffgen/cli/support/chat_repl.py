"""``diffgen chat``'s read-eval-print loop, whatever answers it (in-process model or a server).

The loop reads lines (:func:`line_reader`: prompt_toolkit's line editing and history on a
terminal, plain lines from a pipe), runs the slash commands itself and sends everything else as
a user turn to a backend: an object whose ``reply(messages, think=, seed=)`` yields
``("thought", delta)`` / ``("answer", delta)`` pieces as the answer grows and one last
``("done", Reply)``, and whose ``reset()`` forgets any per-conversation state.

Streams: the answer goes to stdout, piece by piece as it arrives; thoughts go to stderr (dimmed
on a terminal), never into the answer; prompts, notices and errors go to stderr too. Ctrl-C
during an answer stops that turn (dropped from the conversation, which is otherwise kept) and
returns to the prompt; Ctrl-C at the prompt clears the line; Ctrl-D (end of input) or ``/exit``
leaves with exit code 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Optional

from diffgen.errors import DiffgenError

if TYPE_CHECKING:
    from diffgen.cli.chat import LocalChat
    from diffgen.cli.support.chat_client import RemoteChat

HELP = """\
Commands:
  /think          toggle thinking mode (thoughts shown dimmed on stderr, never in the answer)
  /system TEXT    set the system prompt (/system alone removes it)
  /reset          start a new conversation (the system prompt and thinking mode stay)
  /save PATH      write the conversation as JSON messages to PATH
  /help           this list
  /exit           leave (so does Ctrl-D)
Start a line with // to send a message that begins with /. Ctrl-C stops an answer; at the
prompt it clears the line."""

DIM, RESET = "\x1b[2m", "\x1b[0m"


@dataclass(frozen=True)
class Reply:
    """One finished answer.

    Attributes:
        text: the answer (what the conversation keeps as the assistant's turn).
        thoughts: the thought channel's text, or ``None`` when none was opened.
        finish_reason: ``"stop"`` (the model ended it) or ``"length"`` (the token limit cut it).
        stats: a short line about the turn for ``--stats`` (``None``: nothing to say).
    """

    text: str
    thoughts: Optional[str]
    finish_reason: str
    stats: Optional[str] = None


@dataclass
class Chat:
    """The conversation and the switches that shape the next turn.

    Attributes:
        messages: the user and assistant turns so far, OpenAI-style ``{"role", "content"}``
            (assistant turns also carry ``reasoning_content`` when they had thoughts; it is not
            sent back to the model).
        system: the system prompt, or ``None``.
        think: thinking mode.
        seed: the base seed (``--seed``): the i-th turn sent (from 0) uses ``seed + i``;
            ``None``: a fresh random seed each turn.
        turns: turns sent so far (interrupted and failed ones included), the i above.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    system: Optional[str] = None
    think: bool = False
    seed: Optional[int] = None
    turns: int = 0

    def prompt_messages(self) -> list[dict[str, str]]:
        """What the model is given: the system turn (if any) and the turns, text only."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def saved(self) -> list[dict[str, Any]]:
        """What ``/save`` writes: the system turn (if any) and every turn with its thoughts."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages]

    def next_seed(self) -> Optional[int]:
        from diffgen.settings import SEED_LIMIT

        seed = None if self.seed is None else (self.seed + self.turns) % SEED_LIMIT
        self.turns += 1
        return seed


class Streams:
    """Where the REPL writes. Attributes: ``out`` the answers; ``err`` prompts, notices,
    thoughts and errors; ``dim`` whether thoughts are dimmed with ANSI codes."""

    def __init__(self, out: IO[str], err: IO[str], *, dim: bool):
        self.out, self.err, self.dim = out, err, dim

    def notice(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def error(self, text: str) -> None:
        self.notice(f"diffgen: error: {text}")

    def answer(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def thought(self, text: str) -> None:
        self.err.write(f"{DIM}{text}{RESET}" if self.dim else text)
        self.err.flush()


def is_saved_chat(path: Path) -> bool:
    """Whether ``path`` holds a conversation ``/save`` wrote (a JSON list of messages): a file
    ``/save`` may replace."""
    try:
        data = json.loads(Path(path).read_bytes())
    except ValueError:
        return False
    return isinstance(data, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in data)


class Repl:
    """The loop: ``run()`` reads lines until ``/exit`` or the end of input and returns 0.

    ``read(prompt)`` returns the next line (without its newline), raises ``EOFError`` at the end
    of input and ``KeyboardInterrupt`` when Ctrl-C is pressed at the prompt.
    """

    def __init__(self, backend: LocalChat | RemoteChat, chat: Chat, streams: Streams, read: Callable[[str], str],
                 *, stats: bool = False):
        self.backend, self.chat, self.streams, self.read, self.stats = backend, chat, streams, read, stats
        self._armed: Callable[[], Any] = contextlib.nullcontext

    def run(self) -> int:
        with _sigint_only_during_answers() as armed:
            self._armed = armed
            while True:
                try:
                    line = self.read(">>> ")
                except KeyboardInterrupt:  # Ctrl-C at the prompt (a key there): the line is dropped
                    continue
                except EOFError:
                    return 0
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/") and not text.startswith("//"):
                    if self.command(text) == "exit":
                        return 0
                    continue
                self.turn(text[1:] if text.startswith("//") else line.rstrip("\r\n"))

    def command(self, text: str) -> Optional[str]:
        name, _, argument = text.partition(" ")
        argument = argument.strip()
        chat, say = self.chat, self.streams.notice
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            say(HELP)
        elif name == "/think":
            chat.think = not chat.think
            say(f"thinking mode {'on' if chat.think else 'off'}")
        elif name == "/system":
            chat.system = argument or None
            say(f"system prompt set ({len(argument)} characters)" if argument else "system prompt removed")
        elif name == "/reset":
            chat.messages.clear()
            self.backend.reset()
            say("new conversation")
        elif name == "/save":
            self.save(argument)
        else:
            self.streams.error(f"unknown command {name} — /help lists the commands; start a line with // to send "
                               "a message that begins with /")
        return None

    def save(self, argument: str) -> None:
        if not argument:
            self.streams.error("/save needs a file name, e.g. /save chat.json")
            return
        from diffgen import outputs

        data = json.dumps(self.chat.saved(), ensure_ascii=False, indent=2) + "\n"
        try:
            # The one output policy: never a file that is not a saved conversation, written atomically.
            outputs.check(Path(argument), "/save", ours=is_saved_chat, kind="a conversation /save wrote",
                          override="remove it first to replace it")
            outputs.write_text(Path(argument), data, "/save")
        except DiffgenError as exc:
            self.streams.error(exc.message + (f" — {exc.hint}" if exc.hint else ""))
            return
        self.streams.notice(f"saved {len(self.chat.saved())} messages to {argument}")

    def turn(self, text: str) -> None:
        """Send one user turn and stream its answer. Whatever stops it before the end (Ctrl-C, an
        error, even a second Ctrl-C while the first is handled) leaves the conversation as it was."""
        before = len(self.chat.messages)
        done = False
        try:
            done = self._turn(text)
        finally:
            if not done:
                del self.chat.messages[before:]

    def _turn(self, text: str) -> bool:
        chat, streams = self.chat, self.streams
        chat.messages.append({"role": "user", "content": text})
        pieces: Optional[Iterator[Any]] = None
        answered = thinking = False
        try:
            pieces = self.backend.reply(chat.prompt_messages(), think=chat.think, seed=chat.next_seed())
            reply = None
            with self._armed():
                for kind, value in pieces:
                    if kind == "thought" and value:
                        if not thinking:
                            streams.thought("thinking: ")
                            thinking = True
                        streams.thought(value)
                    elif kind == "answer" and value:
                        if thinking:
                            streams.notice("")
                            thinking = False
                        streams.answer(value)
                        answered = True
                    elif kind == "done":
                        reply = value
        except KeyboardInterrupt:
            self._close(pieces)
            self._end_lines(answered, thinking)
            streams.notice("diffgen: interrupted; this turn was dropped (the conversation before it is kept)")
            return False
        except DiffgenError as exc:
            self._close(pieces)
            self._end_lines(answered, thinking)
            streams.error(exc.message + (f" — {exc.hint}" if exc.hint else ""))
            return False
        except Exception as exc:  # one turn failing unexpectedly does not end the conversation
            from diffgen.cli.support import funnel

            self._close(pieces)
            self._end_lines(answered, thinking)
            if funnel.report(exc, doing="answering") is None:  # DIFFGEN_DEBUG=1: the traceback
                raise
            return False
        if thinking:
            streams.notice("")
        streams.answer("\n")
        assert reply is not None, "a backend's reply ends with ('done', Reply)"
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.thoughts:
            message["reasoning_content"] = reply.thoughts
        chat.messages.append(message)
        if reply.finish_reason == "length":
            streams.notice("diffgen: the answer was cut at the token limit (--max-new-tokens)")
        if self.stats and reply.stats:
            streams.notice(reply.stats)
        return True

    def _end_lines(self, answered: bool, thinking: bool) -> None:
        if thinking:
            self.streams.notice("")
        if answered:
            self.streams.answer("\n")

    @staticmethod
    def _close(pieces: Optional[Iterator[Any]]) -> None:
        close = getattr(pieces, "close", None)
        if close is not None:
            try:
                close()
            except KeyboardInterrupt:  # a second Ctrl-C while closing: the turn is dropped anyway
                pass


@contextlib.contextmanager
def _sigint_only_during_answers() -> Iterator[Callable[[], Any]]:
    """While the REPL runs, SIGINT (Ctrl-C outside prompt_toolkit's raw mode) raises
    ``KeyboardInterrupt`` only inside the context the yielded function opens (an answer streaming).

    Elsewhere (between an answer and the next prompt) a Ctrl-C has nothing to stop, and raising
    there could land outside any handler and end the chat; prompt_toolkit reads Ctrl-C at the
    prompt as a key, not a signal. Yields a no-op context where signals cannot be set (not the
    main thread)."""
    import signal
    import threading

    state = {"armed": False}

    @contextlib.contextmanager
    def armed() -> Iterator[None]:
        state["armed"] = True
        try:
            yield
        finally:
            state["armed"] = False

    def handler(signum: int, frame: Any) -> None:
        if state["armed"]:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield contextlib.nullcontext
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield armed
    finally:
        signal.signal(signal.SIGINT, previous)


# -- reading lines --------------------------------------------------------------------------------


def history_path() -> Path:
    """The chat history file: ``$XDG_STATE_HOME/diffgen/chat_history`` on Linux (platformdirs'
    user state directory elsewhere)."""
    from platformdirs import user_state_dir

    return Path(user_state_dir("diffgen", appauthor=False)) / "chat_history"


def line_reader(stdin: IO[str], err: IO[str]) -> Callable[[str], str]:
    """A function that reads one line: prompt_toolkit (line editing, history in
    :func:`history_path`) when ``stdin`` is a terminal, else plain lines with no prompt."""
    if _isatty(stdin):
        return terminal_reader(err)
    return plain_reader(stdin, err)


def plain_reader(stdin: IO[str], err: Optional[IO[str]] = None) -> Callable[[str], str]:
    """Lines of a piped stdin, read as bytes: at most :data:`~diffgen.prompt.MAX_INPUT_BYTES` a line
    (an endless line is one clear error, not all of the memory), bytes that are not UTF-8 replaced
    by U+FFFD with a warning on ``err`` (as ``diffgen run`` does)."""
    from diffgen import prompt as prompt_mod

    buffer = getattr(stdin, "buffer", None)
    number = 0

    def read(prompt: str) -> str:
        nonlocal number
        if buffer is None:  # a text stream (tests): already decoded
            line = stdin.readline(prompt_mod.MAX_INPUT_BYTES + 1)
        else:
            data = buffer.readline(prompt_mod.MAX_INPUT_BYTES + 1)
            number += 1
            line, warning = prompt_mod.decode_input(data, f"line {number} of stdin")
            if warning and err is not None:
                err.write(f"diffgen: warning: {warning}\n")
        if not line:
            raise EOFError
        if len(line) > prompt_mod.MAX_INPUT_BYTES:
            raise prompt_mod.PromptTooLongError(
                f"a line of stdin holds more than {prompt_mod.MAX_INPUT_BYTES >> 20} MiB of text, more than a "
                "model's context can take", "give shorter messages")
        return line.rstrip("\n")

    return read


def terminal_reader(err: IO[str], *, input: Any = None, output: Any = None,
                    history: Optional[Path] = None) -> Callable[[str], str]:
    """prompt_toolkit's prompt, drawn on stderr. ``input``/``output`` replace the terminal (tests);
    a history file that cannot be created leaves the history in memory only."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.output import create_output

    path = history if history is not None else history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)  # what was typed is the user's alone to read
        store: Any = FileHistory(str(path))
    except OSError:
        store = InMemoryHistory()
    session: Any = PromptSession(history=store, input=input,
                                 output=output if output is not None else create_output(stdout=err))

    def read(prompt: str) -> str:
        return session.prompt(prompt)

    return read


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def default_streams(no_color: bool = False) -> Streams:
    dim = _isatty(sys.stderr) and not no_color and not os.environ.get("NO_COLOR")
    return Streams(sys.stdout, sys.stderr, dim=dim)
