"""Host-side records of the denoising, and the JSONL trace that stores them.

The generator's events hold device tensors; a view or a trace copies from them only what it
draws: per step one row's canvas ids, accepted mask, per-token entropy and draft ids — never
logits. :func:`records` turns events into :class:`StepRecord` / :class:`CanvasRecord`, which
the live view, the plain step log, the trace writer and ``diffgen replay`` all consume, so a
replay draws exactly what the live run drew.

Trace format (JSON Lines, one object per line, ``type`` first):

* ``header``: ``version``, ``model``, ``prompt``, ``settings``, ``canvas_length``,
  ``channel_ids`` (thought-channel open/close ids or null);
* ``step``: the fields of :class:`StepRecord`;
* ``canvas``: the fields of :class:`CanvasRecord`;
  (``fixed`` is written only for runs with clamped positions, ``fill`` and ``edit``; a line
  without it, as in every trace written before it existed, reads back as ``fixed=None``);
* ``result``: ``text``, ``thoughts``, ``finish_reason``, ``stats``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from diffgen.denoise.channels import CHANNEL_CLOSE, CHANNEL_OPEN
from diffgen.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from diffgen.denoise.events import Event

TRACE_VERSION = 1
ENTROPY_DECIMALS = 4


@dataclass(frozen=True)
class StepRecord:
    """One denoising step of one row, on the host.

    Attributes:
        canvas: canvas index, from 0. canvases: canvases planned.
        step: steps done on this canvas, from 1. max_steps: N.
        temperature: the schedule's temperature at this step.
        tokens: the canvas ids after acceptance and renoising.
        accepted: per position, whether its token was accepted at this step (the rest is noise).
        texts: display text per position for accepted positions, ``""`` for noise.
        draft: the argmax ids (what the canvas would commit to now).
        entropy: per-token entropy in nats (rounded to 4 decimals).
        mean_entropy: mean token entropy in nats.
        finished: whether this row stopped denoising this canvas.
        elapsed: seconds since the generation started.
        fixed: per position, whether it is clamped (template or document text, pad after it:
            the model never chooses it), or ``None`` when nothing is.
    """

    canvas: int
    canvases: int
    step: int
    max_steps: int
    temperature: float
    tokens: list[int]
    accepted: list[bool]
    texts: list[str]
    draft: list[int]
    entropy: list[float]
    mean_entropy: float
    finished: bool
    elapsed: float
    fixed: list[bool] | None = None

    @property
    def accepted_count(self) -> int:
        return sum(self.accepted)

    @property
    def fixed_count(self) -> int:
        return sum(self.fixed) if self.fixed else 0

    def to_stream(self) -> dict[str, Any]:
        """The server stream's ``diffgen_step`` fields (its published names, unlike the trace's:
        ``canvas_tokens``, ``token_entropy``, ``accepted`` and ``fixed`` as 0/1), with ``texts``
        so that a client without the model's tokenizer draws exactly what a local run draws.
        :meth:`from_stream` reads them back: the one mapping between the two shapes."""
        return {"canvas": self.canvas, "canvases": self.canvases, "step": self.step, "max_steps": self.max_steps,
                "temperature": self.temperature, "elapsed": self.elapsed, "draft": self.draft,
                "canvas_tokens": self.tokens, "accepted": [int(a) for a in self.accepted],
                "token_entropy": self.entropy, "mean_entropy": self.mean_entropy, "finished": self.finished,
                "fixed": _bits(self.fixed), "texts": self.texts}

    @classmethod
    def from_stream(cls, data: dict[str, Any]) -> StepRecord:
        """The record a local run's view gets, from a ``diffgen_step`` payload (:meth:`to_stream`)."""
        return cls(canvas=data["canvas"], canvases=data["canvases"], step=data["step"], max_steps=data["max_steps"],
                   temperature=data["temperature"], tokens=list(data["canvas_tokens"]),
                   accepted=[bool(a) for a in data["accepted"]],
                   texts=list(data.get("texts") or [""] * len(data["canvas_tokens"])), draft=list(data["draft"]),
                   entropy=list(data["token_entropy"]), mean_entropy=data["mean_entropy"],
                   finished=bool(data["finished"]), elapsed=data["elapsed"], fixed=_flags(data.get("fixed")))


@dataclass(frozen=True)
class CanvasRecord:
    """A committed canvas of one row: ``tokens`` ids, ``texts`` their display text,
    ``steps`` the denoising steps it took, ``finished`` whether the row has met an EOS,
    ``elapsed`` seconds since the generation started, ``fixed`` per position whether it was
    clamped (``None`` when nothing was)."""

    canvas: int
    canvases: int
    tokens: list[int]
    texts: list[str]
    steps: int
    finished: bool
    elapsed: float
    fixed: list[bool] | None = None

    def to_stream(self) -> dict[str, Any]:
        """The server stream's ``diffgen_canvas`` fields (``fixed`` as 0/1); :meth:`from_stream` reads them back."""
        return {"canvas": self.canvas, "canvases": self.canvases, "tokens": self.tokens, "texts": self.texts,
                "steps": self.steps, "finished": self.finished, "elapsed": self.elapsed, "fixed": _bits(self.fixed)}

    @classmethod
    def from_stream(cls, data: dict[str, Any]) -> CanvasRecord:
        """The record a local run's view gets, from a ``diffgen_canvas`` payload (:meth:`to_stream`)."""
        return cls(canvas=data["canvas"], canvases=data["canvases"], tokens=list(data["tokens"]),
                   texts=list(data["texts"]), steps=data["steps"], finished=bool(data["finished"]),
                   elapsed=data["elapsed"], fixed=_flags(data.get("fixed")))


Record = StepRecord | CanvasRecord


def _bits(flags: list[bool] | None) -> list[int] | None:
    return None if flags is None else [int(flag) for flag in flags]


def _flags(bits: list[int] | None) -> list[bool] | None:
    return None if bits is None else [bool(bit) for bit in bits]


class TokenTexts:
    """Display text per token position, with a per-id cache.

    Special tokens show as nothing (the answer text skips them too). A run of tokens that each decode to a partial UTF-8
    character (byte fallback) is decoded together; its text goes to the run's first position.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        vocab_ids = [tokenizer.convert_tokens_to_ids(t) for t in (CHANNEL_OPEN, CHANNEL_CLOSE)]
        unk = tokenizer.unk_token_id
        self.channel_ids = None if any(i is None or i == unk for i in vocab_ids) else tuple(vocab_ids)
        self.separator = _separator(tokenizer)

    def piece(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=True)
            self._cache[token_id] = text
        return text

    def texts(self, ids: Sequence[int], keep: Sequence[bool] | None = None) -> list[str]:
        """Texts for ``ids``; positions where ``keep`` is false get ``""`` without decoding. A
        tokenizer that joins tokens with a space when it decodes (word-level ones) gets that space
        before every token but the first, so that the texts join as the answer is decoded."""
        out = [self.piece(t) if keep is None or keep[i] else "" for i, t in enumerate(ids)]
        if self.separator:
            out = [self.separator + text if i and text else text for i, text in enumerate(out)]
        i = 0
        while i < len(out):
            if "\ufffd" not in out[i]:
                i += 1
                continue
            j = i
            while j < len(out) and "\ufffd" in out[j] and (keep is None or keep[j]):
                j += 1
            joined = self.tokenizer.decode(list(ids[i:j]), skip_special_tokens=True)
            if "\ufffd" not in joined:
                out[i:j] = [joined] + [""] * (j - i - 1)
            i = max(j, i + 1)
        return out


def _separator(tokenizer: PreTrainedTokenizerBase) -> str:
    """What ``tokenizer.decode`` puts between two tokens beyond their own texts: ``" "`` for
    word-level tokenizers (no decoder: tokens joined with spaces), ``""`` for the usual ones."""
    try:
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        probe = [i for i in range(min(len(tokenizer), 512)) if i not in special][-2:]
        if len(probe) < 2:
            return ""
        alone = [tokenizer.decode([i], skip_special_tokens=True) for i in probe]
        joined = tokenizer.decode(probe, skip_special_tokens=True)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say: draw the pieces as they are
        return ""
    if not all(alone) or "\ufffd" in joined:
        return ""
    return " " if joined == alone[0] + " " + alone[1] and not alone[1].startswith(" ") else ""


def records(events: Iterable[Event], texts: TokenTexts, row: int = 0) -> Iterator[Record]:
    """Host records of ``row`` from generator events (copies only what views draw)."""
    from diffgen.denoise.loop import StepEvent

    for event in events:
        if isinstance(event, StepEvent):
            tokens = event.canvas_tokens[row].tolist()
            accepted = event.accepted[row].tolist()
            yield StepRecord(
                canvas=event.canvas,
                canvases=event.canvases,
                step=event.step,
                max_steps=event.max_steps,
                temperature=round(event.temperature, 6),
                tokens=tokens,
                accepted=accepted,
                texts=texts.texts(tokens, accepted),
                draft=event.draft[row].tolist(),
                entropy=[round(h, ENTROPY_DECIMALS) for h in event.token_entropy[row].tolist()],
                mean_entropy=float(event.mean_entropy[row]),
                finished=bool(event.finished[row]),
                elapsed=event.elapsed,
                fixed=_fixed(event, row),
            )
        else:
            tokens = event.tokens[row].tolist()
            yield CanvasRecord(
                canvas=event.canvas,
                canvases=event.canvases,
                tokens=tokens,
                texts=texts.texts(tokens),
                steps=event.steps,
                finished=bool(event.finished[row]),
                elapsed=event.elapsed,
                fixed=_fixed(event, row),
            )


def _fixed(event: Event, row: int) -> list[bool] | None:
    fixed = getattr(event, "fixed", None)
    return None if fixed is None else fixed[row].tolist()


# -- the trace file --------------------------------------------------------------------------


class TraceWriter:
    """Writes a trace as JSON Lines, one flushed line per record.

    A write that fails (a full disk) does not stop the run being traced: the writer keeps the
    error in ``failure`` and writes nothing more; the command reports it once the answer is out.
    """

    def __init__(self, out: IO[str]):
        self.out = out
        self.failure: OSError | None = None

    def _line(self, kind: str, data: dict[str, Any]) -> None:
        if self.failure is not None:
            return
        try:
            self.out.write(json.dumps({"type": kind, **data}, ensure_ascii=False) + "\n")
            self.out.flush()
        except OSError as exc:
            self.failure = exc

    def header(self, *, model: str, prompt: str, settings: dict[str, Any], canvas_length: int,
               channel_ids: Sequence[int] | None) -> None:
        self._line("header", {"version": TRACE_VERSION, "model": model, "prompt": prompt, "settings": settings,
                              "canvas_length": canvas_length,
                              "channel_ids": list(channel_ids) if channel_ids else None})

    def update(self, record: Record) -> None:
        """Append one record (the same interface as the views)."""
        data = dataclasses.asdict(record)
        if data.get("fixed") is None:
            data.pop("fixed", None)  # runs without clamping write the lines they always wrote
        self._line("step" if isinstance(record, StepRecord) else "canvas", data)

    def result(self, data: dict[str, Any]) -> None:
        self._line("result", data)


@dataclass(frozen=True)
class Trace:
    """A trace read back: the header dict, the records in order, the result dict (or None)."""

    header: dict[str, Any]
    records: list[Record]
    result: dict[str, Any] | None

    @property
    def channel_ids(self) -> tuple[int, int] | None:
        ids = self.header.get("channel_ids")
        return tuple(ids) if ids else None


def is_trace(path: Path) -> bool:
    """Whether ``path`` holds a diffgen trace (its first line is a trace header): a file that
    ``--trace`` may replace without ``--overwrite``."""
    with open(path, "rb") as handle:
        first = handle.readline(1 << 22)
    try:
        data = json.loads(first)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("type") == "header" and "version" in data


def read_trace(path: Path) -> Trace:
    """Read a trace file; a missing or malformed file is a :class:`UsageError` naming the line."""
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not a diffgen trace: byte {exc.start} is not UTF-8 text",
                         "write traces with `diffgen run --trace FILE`") from exc
    header: dict[str, Any] | None = None
    result = None
    out: list[Record] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            kind = data.pop("type")
            if kind == "header":
                header = data
            elif kind == "step":
                out.append(StepRecord(**data))
            elif kind == "canvas":
                out.append(CanvasRecord(**data))
            elif kind == "result":
                result = data
            else:
                raise ValueError(f"unknown record type {kind!r}")
        except (ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"{path}:{number} is not a diffgen trace line ({exc})",
                             "write traces with `diffgen run --trace FILE`") from exc
    if header is None:
        raise UsageError(f"{path} has no trace header", "write traces with `diffgen run --trace FILE`")
    if header.get("version") != TRACE_VERSION:
        raise UsageError(f"{path} is a version {header.get('version')} trace; this diffgen reads version {TRACE_VERSION}")
    return Trace(header, out, result)
