"""Argument + stdin + files + system + thinking -> messages -> token ids.

Composition rule (the same as ``cat notes.md | llm "summarise"``): context comes first —
piped stdin, then each ``--file`` under a ``--- NAME ---`` line so that the model can tell the
files apart — each with trailing whitespace stripped and separated by a blank line, and the
prompt argument comes last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from diffgen.errors import UsageError


@dataclass(frozen=True)
class PromptText:
    """Attributes: ``text`` the composed prompt; ``warnings`` things the user should hear
    about (e.g. invalid UTF-8 that was replaced)."""

    text: str
    warnings: tuple[str, ...] = ()


def decode_input(data: bytes, source: str) -> tuple[str, str | None]:
    """Decode UTF-8, replacing invalid bytes; return the text and a warning if any were replaced."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), f"{source} is not valid UTF-8; invalid bytes were replaced by U+FFFD"


def read_stdin(stream: IO[Any] | None) -> bytes | None:
    """The bytes piped on ``stream``, or ``None`` when it is a terminal or absent."""
    if stream is None or stream.closed:
        return None
    try:
        if stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    buffer = getattr(stream, "buffer", None)
    data = buffer.read() if buffer is not None else stream.read()
    return data.encode("utf-8") if isinstance(data, str) else data


def compose(argument: str | None, stdin: bytes | None, files: Sequence[Path] = ()) -> PromptText:
    """Build the prompt from its parts; raises :class:`UsageError` when nothing is left."""
    warnings: list[str] = []
    parts: list[str] = []
    if stdin is not None:
        text, warning = decode_input(stdin, "stdin")
        if warning:
            warnings.append(warning)
        if text.strip():
            parts.append(text.rstrip())
    for path in files:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read --file {path}: {exc.strerror or exc}") from exc
        text, warning = decode_input(data, str(path))
        if warning:
            warnings.append(warning)
        if text.strip():
            parts.append(file_header(path) + "\n" + text.rstrip())
        else:
            warnings.append(f"--file {path} is empty; it was left out")
    if argument is not None and argument != "-" and argument.strip():
        parts.append(argument)
    if not parts:
        raise UsageError(
            "no prompt: give one as an argument, pipe it on stdin, or pass --file",
            'e.g. diffgen run "Why is the sky blue?"',
        )
    return PromptText("\n\n".join(parts), tuple(warnings))


def file_header(path: Path | str) -> str:
    """The line that names a pasted file: ``--- a.py ---``."""
    return f"--- {path} ---"


def messages(text: str, system: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one user turn, with an optional system turn."""
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": text}]


def encode(tokenizer: Any, text: str, *, system: str | None = None, think: bool = False,
           raw: bool = False) -> list[int]:
    """Token ids for the model.

    ``raw``: the text is tokenised as is (the tokenizer adds only its BOS), no chat template.
    Otherwise the checkpoint's chat template renders a system turn (if any), the user turn and
    the start of the model turn, with ``enable_thinking`` switching thinking mode.
    """
    if raw:
        if system:
            raise UsageError("--system needs the chat template; drop --raw or put the system text in the prompt")
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return encode_messages(tokenizer, messages(text, system), think=think)


def encode_messages(tokenizer: Any, turns: Sequence[dict[str, str]], *, think: bool = False) -> list[int]:
    """Token ids for a whole conversation (``[{"role", "content"}, ...]``) rendered by the
    checkpoint's chat template, ending with the start of the model's turn. :func:`encode` of one
    user turn is this with :func:`messages`; the server's chat endpoint sends whole conversations."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("this checkpoint's tokenizer has no chat template", "use --raw to send the text as is")
    rendered = tokenizer.apply_chat_template(
        list(turns), add_generation_prompt=True, tokenize=False, enable_thinking=think
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
