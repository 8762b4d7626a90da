"""Argument + stdin + files + system + thinking -> messages -> token ids.

Composition rule (the same as ``cat notes.md | llm "summarise"``): context comes first —
piped stdin, then each ``--file`` under a ``--- NAME ---`` line so that the model can tell the
files apart — each with trailing whitespace stripped and separated by a blank line, and the
prompt argument comes last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from diffgen.errors import DiffgenError, PromptTooLongError, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: The most bytes of prompt text read from stdin and files together, whatever the model: more than
#: any DiffusionGemma context holds (262,144 tokens of at most a few hundred bytes each would be
#: more, but no tokenizer has such tokens throughout). Reading stops here, so endless input
#: (``-f /dev/zero``) costs this much memory, not all of it; :func:`check_fits` then compares
#: the text with the model's own context before anything is tokenised.
MAX_INPUT_BYTES = 64 << 20


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


def read_limited(handle: IO[Any], name: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """At most ``limit`` bytes from ``handle``; more is :class:`PromptTooLongError`, raised as soon
    as the limit is passed (memory stays bounded on endless input)."""
    data = handle.read(limit + 1)
    data = data.encode("utf-8") if isinstance(data, str) else data
    if len(data) > limit:
        raise PromptTooLongError(f"{name} holds more than {limit >> 20} MiB of text, more than a model's context "
                                 "can take", "give a shorter input (e.g. head -c 100K FILE)")
    return data


def read_file(path: Path | str, what: str = "--file", limit: int = MAX_INPUT_BYTES) -> bytes:
    """A file's bytes, read no further than ``limit`` (:func:`read_limited`); an unreadable file is
    a :class:`UsageError` naming it."""
    try:
        with open(path, "rb") as handle:
            return read_limited(handle, f"{what} {path}", limit)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def check_fits(text: str, context: int | None, tokenizer: PreTrainedTokenizerBase, what: str = "the prompt") -> None:
    """Refuse, before tokenising it, a text that cannot fit ``context`` tokens: no token of the
    tokenizer is longer than its longest vocabulary entry, so ``bytes / longest`` is the fewest
    tokens the text can become."""
    if not context:
        return
    size = len(text.encode("utf-8", "surrogatepass"))
    longest = longest_token_bytes(tokenizer)
    if size > context * longest:
        raise PromptTooLongError(f"{what} is {size:,} bytes: at least {-(-size // longest):,} tokens, more than the "
                                 f"model's context of {context:,}", "give a shorter input")


def longest_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most UTF-8 bytes one token of ``tokenizer`` stands for (an upper bound: the SentencePiece
    space mark counts 3 bytes for the 1 it decodes to)."""
    cached = getattr(tokenizer, "_diffgen_longest", None)
    if cached is None:
        try:
            cached = max((len(token.encode("utf-8", "surrogatepass")) for token in tokenizer.get_vocab()), default=1)
        except Exception:  # noqa: BLE001 - a tokenizer without a readable vocabulary: no bound
            cached = 1 << 30
        try:
            tokenizer._diffgen_longest = max(cached, 1)
        except AttributeError:
            pass
    return max(int(cached), 1)


def read_stdin(stream: IO[Any] | None, limit: int = MAX_INPUT_BYTES) -> bytes | None:
    """The bytes piped on ``stream`` (at most ``limit``, see :func:`read_limited`), or ``None``
    when it is a terminal or absent."""
    if stream is None or stream.closed:
        return None
    try:
        if stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    buffer = getattr(stream, "buffer", None)
    return read_limited(buffer if buffer is not None else stream, "stdin", limit)


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
    budget = MAX_INPUT_BYTES - (len(stdin) if stdin else 0)
    for path in files:
        data = read_file(path, limit=max(budget, 0))
        budget -= len(data)
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


def encode(tokenizer: PreTrainedTokenizerBase, text: str, *, system: str | None = None, think: bool = False,
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


def encode_messages(tokenizer: PreTrainedTokenizerBase, turns: Sequence[dict[str, str]], *,
                    think: bool = False) -> list[int]:
    """Token ids for a whole conversation (``[{"role", "content"}, ...]``) rendered by the
    checkpoint's chat template, ending with the start of the model's turn. :func:`encode` of one
    user turn is this with :func:`messages`; the server's chat endpoint sends whole conversations."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("this checkpoint's tokenizer has no chat template", "use --raw to send the text as is")
    with template_errors(tokenizer):
        rendered = tokenizer.apply_chat_template(
            list(turns), add_generation_prompt=True, tokenize=False, enable_thinking=think
        )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


@contextlib.contextmanager
def template_errors(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """A chat template that does not compile (or raises while rendering) becomes a
    :class:`DiffgenError` naming the file that holds it, instead of jinja2's exception."""
    import jinja2

    try:
        yield
    except jinja2.TemplateError as exc:
        where = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
        source = where / "chat_template.jinja"
        if not source.is_file():
            source = where / "tokenizer_config.json"
        line = getattr(exc, "lineno", None)
        if isinstance(exc, jinja2.TemplateSyntaxError):
            raise DiffgenError(f"the chat template in {source} has a syntax error{f' on line {line}' if line else ''}:"
                               f" {exc.message}", "fix the template, or pass --raw to send the text as is") from exc
        raise DiffgenError(f"the chat template in {source} refused the conversation: {exc}",
                           "check the messages' roles and order, or pass --raw") from exc
