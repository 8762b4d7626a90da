"""Editing in place: marked spans of a text revised, everything else clamped.

A document is text with spans to revise, marked ``{{~old text~}}`` (:func:`parse_marked`) or
given as line ranges (:func:`parse_lines`; the file is then taken literally). Both parse
without torch or a tokenizer, so the CLI checks a document before anything is loaded.
:func:`edit` lays the document out on canvases like a template (:mod:`diffgen.denoise.constrained.fill`):

* every token outside the spans is clamped at every step of every canvas it lands on;
* a span whose old text is ``n`` tokens gets :func:`budget` ``(n) = n + max(8, n // 2)``
  positions, so its revision may be longer than the old text by that slack, or shorter;
* the span's positions *start* from the old text's tokens, then pad for the slack, instead
  of uniform noise (``init`` in :func:`~diffgen.denoise.loop.stream`); nothing pins them:
  the sampler renoises whatever it does not accept, as it would any position;
* a span's new text is its tokens cut at the first EOS, decoded without special tokens, so
  pad (the unused slack, or any position the model leaves empty) is dropped; when what is
  left is exactly the old text's tokens the old text is kept byte for byte;
* the output is the document's own text, byte for byte, with each span replaced.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffgen.denoise.options import Execution
from diffgen.errors import UsageError

if TYPE_CHECKING:
    from diffgen.denoise.constrained.fill import Layout
    from diffgen.denoise.events import Event
    from diffgen.loading.loader import LoadedModel
    from diffgen.settings import GenerationSettings

OPEN, CLOSE = "{{~", "~}}"
#: Fewest extra positions a span gets beyond its old text's tokens.
MIN_SLACK = 8
_MARK_HINT = "mark each span to revise as {{~old text~}}, or give line ranges with --lines 3-5"


def budget(old_tokens: int) -> int:
    """Canvas positions a span whose old text is ``old_tokens`` tokens may use."""
    return old_tokens + max(MIN_SLACK, old_tokens // 2)


@dataclass(frozen=True)
class Span:
    """A span to revise.

    Attributes:
        old: its text in the document as given (may be empty: an insertion point).
    """

    old: str


@dataclass(frozen=True)
class Document:
    """A parsed document.

    Attributes:
        pieces: the document in order: fixed text (``str``, never empty) and :class:`Span`.
    """

    pieces: tuple[str | Span, ...]

    @property
    def spans(self) -> tuple[Span, ...]:
        return tuple(piece for piece in self.pieces if isinstance(piece, Span))

    @property
    def original(self) -> str:
        """The document with each span's old text in place (markers removed)."""
        return "".join(piece.old if isinstance(piece, Span) else piece for piece in self.pieces)


def _document(pieces: list[str | Span]) -> Document:
    document = Document(tuple(piece for piece in pieces if not (isinstance(piece, str) and piece == "")))
    if not document.spans:
        raise UsageError("the file marks no span to revise", _MARK_HINT)
    return document


def parse_marked(text: str) -> Document:
    """Split ``text`` at its ``{{~old~}}`` markers; a malformed marker is a :class:`UsageError`.

    Refused: a ``{{~`` with no ``~}}`` after it, a ``{{~`` inside a span, a ``~}}`` with no
    ``{{~`` before it, and a text with no span at all.
    """
    pieces: list[str | Span] = []
    at = 0
    while True:
        start = text.find(OPEN, at)
        stray = text.find(CLOSE, at)
        if stray >= 0 and (start < 0 or stray < start):
            raise UsageError(f"the file has a ~}}}} with no {{{{~ before it at character {stray + 1}", _MARK_HINT)
        if start < 0:
            pieces.append(text[at:])
            break
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:
            raise UsageError(f"the file has an unclosed {{{{~ at character {start + 1}", _MARK_HINT)
        nested = text.find(OPEN, start + len(OPEN), end)
        if nested >= 0:
            raise UsageError(f"the file has a {{{{~ inside a span at character {nested + 1}", _MARK_HINT)
        pieces += [text[at:start], Span(text[start + len(OPEN):end])]
        at = end + len(CLOSE)
    return _document(pieces)


def parse_lines(text: str, ranges: Sequence[str]) -> Document:
    """``text`` taken literally with the lines in ``ranges`` as spans.

    A range is ``N`` or ``A-B`` (1-based, inclusive). A span holds its lines' text without the
    last line's newline, so the revision keeps the line break after it. Ranges may come in any
    order; overlapping ones, ranges past the end and malformed ones are refused.
    """
    hint = "give --lines as N or A-B (1-based, inclusive), e.g. --lines 3-5 --lines 9"
    lines = text.split("\n")
    count = len(lines) - 1 if text.endswith("\n") else len(lines)
    if text == "":
        count = 0
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    parsed: list[tuple[int, int]] = []
    for item in ranges:
        match = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", item)
        if match is None:
            raise UsageError(f"the line range {item!r} is not N or A-B", hint)
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if first < 1 or last < first:
            raise UsageError(f"the line range {item!r} is empty or starts before line 1", hint)
        if last > count:
            raise UsageError(f"the line range {item!r} goes past the end of the file ({count} lines)", hint)
        parsed.append((first, last))
    parsed.sort()
    for (_, last), (first, _) in zip(parsed, parsed[1:]):
        if first <= last:
            raise UsageError(f"the line ranges overlap at line {first}", hint)
    pieces: list[str | Span] = []
    at = 0
    for first, last in parsed:
        begin = starts[first - 1]
        end = starts[last - 1] + len(lines[last - 1])
        pieces += [text[at:begin], Span(text[begin:end])]
        at = end
    pieces.append(text[at:])
    return _document(pieces)


@dataclass(frozen=True)
class EditedSpan:
    """One revised span.

    Attributes:
        old: the span's old text.
        text: its new text (cut at the first EOS, special tokens and pad dropped).
        start: first position of the span in the generated sequence (0 = first canvas position).
        end: one past its last position (``end - start`` = :func:`budget` of the old tokens).
        old_token_ids: the old text's tokens, which the span's first positions started from.
        token_ids: the span's tokens as the model left them, all ``end - start`` of them.
        mean_entropy: mean entropy (nats) of the span's positions at the last step of its canvas.
    """

    old: str
    text: str
    start: int
    end: int
    old_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    mean_entropy: float


@dataclass(frozen=True)
class EditResult:
    """A revised document.

    Attributes:
        text: the document with each span replaced by its new text.
        original: the document with each span's old text (markers removed).
        spans: the spans in document order.
        token_ids: every generated position, ``canvases x canvas_length`` of them.
        layout: the layout the generation ran on (spans as free positions).
        init: per position, the token it started from (old text, pad for the slack) or ``None``
            (clamped positions).
        prompt_tokens: tokens in the encoder prefix.
        steps_per_canvas: decoder passes per canvas (0 for a canvas of fixed text only).
        settings: the settings used.
        seconds: wall time of the generation, prefill included.
    """

    text: str
    original: str
    spans: tuple[EditedSpan, ...]
    token_ids: tuple[int, ...]
    layout: Layout
    init: tuple[int | None, ...]
    prompt_tokens: int
    steps_per_canvas: tuple[int, ...]
    settings: GenerationSettings
    seconds: float


def edit_layout(document: Document, tokenizer, canvas_length: int, pad_token_id: int
                ) -> tuple[Layout, tuple[int | None, ...], tuple[tuple[int, ...], ...]]:
    """The layout (spans free, the rest clamped), each position's starting token, each span's old tokens."""
    from diffgen.denoise.constrained.fill import Layout

    tokens: list[int] = []
    fixed: list[bool] = []
    init: list[int | None] = []
    spans: list[tuple[int, int]] = []
    olds: list[tuple[int, ...]] = []
    for piece in document.pieces:
        if isinstance(piece, Span):
            old = tuple(tokenizer(piece.old, add_special_tokens=False)["input_ids"]) if piece.old else ()
            size = budget(len(old))
            spans.append((len(tokens), len(tokens) + size))
            olds.append(old)
            tokens += [pad_token_id] * size
            fixed += [False] * size
            init += list(old) + [pad_token_id] * (size - len(old))
        else:
            ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
            tokens += ids
            fixed += [True] * len(ids)
            init += [None] * len(ids)
    length = len(tokens)
    total = -(-length // canvas_length) * canvas_length
    tokens += [pad_token_id] * (total - length)
    fixed += [True] * (total - length)
    init += [None] * (total - length)
    return Layout(tuple(tokens), tuple(fixed), tuple(spans), length), tuple(init), tuple(olds)


def edit(loaded: LoadedModel, prefix: Sequence[int], document: Document | str, settings: GenerationSettings,
         *, execution: Execution = Execution(), on_event: Callable[[Event], None] | None = None) -> EditResult:
    """Revise ``document``'s spans after the encoder prefix ``prefix`` (the instruction's tokens).

    ``execution``: how the loop runs (:class:`~diffgen.denoise.options.Execution`). ``on_event`` is called with every loop event (``--show-steps``, ``--trace``).
    """
    import time

    from diffgen.denoise.constrained.fill import fill_settings, run_layout

    if isinstance(document, str):
        document = parse_marked(document)
    start = time.perf_counter()
    canvas_length = int(loaded.model.config.canvas_length)
    plan, init, olds = edit_layout(document, loaded.tokenizer, canvas_length, settings.pad_token_id)
    settings = fill_settings(settings, plan)
    tokens, entropy, steps = run_layout(loaded, prefix, plan, settings, execution=execution, init=init,
                                        on_event=on_event)
    eos = set(settings.eos_token_ids)
    spans = []
    for (begin, end), span, old in zip(plan.spans, document.spans, olds):
        ids = tokens[begin:end]
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        kept = [t for t in ids[:cut] if t != settings.pad_token_id]
        text = span.old if tuple(kept) == old else loaded.tokenizer.decode(kept, skip_special_tokens=True)
        spans.append(EditedSpan(old=span.old, text=text, start=begin, end=end, old_token_ids=old,
                                token_ids=tuple(ids), mean_entropy=sum(entropy[begin:end]) / (end - begin)))
    parts, revised = [], iter(spans)
    for piece in document.pieces:
        parts.append(next(revised).text if isinstance(piece, Span) else piece)
    return EditResult(text="".join(parts), original=document.original, spans=tuple(spans), token_ids=tuple(tokens),
                      layout=plan, init=init, prompt_tokens=len(prefix), steps_per_canvas=tuple(steps),
                      settings=settings, seconds=time.perf_counter() - start)


def unified_diff(before: str, after: str, name: str) -> str:
    """A unified diff of ``before`` -> ``after`` (``a/name``, ``b/name``), empty when they are equal.

    difflib leaves a last line without a newline unterminated, which ``patch`` cannot read;
    such lines get the ``\\ No newline at end of file`` marker diff(1) writes. Lines end at
    ``\\n`` only (``str.splitlines`` would also break at ``\\r`` and U+2028, which patch does not).
    """
    out = []
    for line in difflib.unified_diff(_lines(before), _lines(after),
                                     fromfile=f"a/{name}", tofile=f"b/{name}"):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def _lines(text: str) -> list[str]:
    return re.findall(r"[^\n]*\n|[^\n]+\Z", text)
