"""The denoising, drawn: a live Rich view for terminals and one plain line per step otherwise.

Both consume :mod:`diffgen.records.trace` records, so ``run --show-steps`` and ``replay`` draw the same
thing. Styles (they survive NO_COLOR, which only drops colour):

* text committed in earlier canvases, and tokens accepted in an earlier step that kept their
  token: the normal style (``settled``);
* tokens accepted at this step: ``bold reverse`` (``new``);
* positions still noise: a dim ``░`` glyph (``noise``);
* clamped positions (``fill``'s template text, ``edit``'s text outside the spans): ``dim``
  text (``fixed``), so what the model chose stands out from what it was given;
* the thought channel: its own dimmed region above the answer.

The live view never saves or restores the cursor (Rich's Live moves up and erases lines), so it
works in tmux and screen; Rich measures wide characters; NO_COLOR is honoured by Rich.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.text import Text

from diffgen.denoise import channels
from diffgen.records.trace import CanvasRecord, Record, StepRecord

SETTLED = ""
NEW = "bold reverse"
NOISE = "dim"
NOISE_GLYPH = "░"
FIXED = "dim"
THOUGHT = "dim italic"
HEADER = "bold"
FOOTER = "dim"
MAX_FPS = 30.0


def plain_line(record: Record) -> str:
    """The line a step (or a committed canvas) prints when stderr is not a terminal."""
    fixed = f" fixed {sum(record.fixed)}/{len(record.fixed)}" if record.fixed else ""
    if isinstance(record, StepRecord):
        return (
            f"canvas {record.canvas + 1}/{record.canvases} step {record.step}/{record.max_steps} "
            f"accepted {record.accepted_count}/{len(record.accepted)}{fixed} H={record.mean_entropy:.2f} "
            f"T={record.temperature:.2f} t={record.elapsed:.2f}s"
        )
    return (f"canvas {record.canvas + 1}/{record.canvases} committed after {record.steps} steps{fixed} "
            f"t={record.elapsed:.2f}s")


def visible(text: str) -> str:
    """Control characters as their Unicode pictures, so a token cannot drive the terminal."""
    return "".join(chr(0x2400 + ord(c)) if ord(c) < 0x20 and c not in "\n\t" else
                   ("\u2421" if c == "\x7f" else c) for c in text)


@dataclass
class _Piece:
    token: int
    text: str
    style: str


@dataclass
class DenoisingState:
    """What the view shows, updated record by record."""

    channel_ids: tuple[int, int] | None = None
    committed: list[_Piece] = field(default_factory=list)
    current: list[_Piece] = field(default_factory=list)
    last_step: StepRecord | None = None
    last: Record | None = None
    committed_tokens: int = 0

    def update(self, record: Record) -> None:
        self.last = record
        if isinstance(record, CanvasRecord):
            fixed = record.fixed or [False] * len(record.tokens)
            self.committed.extend(_Piece(t, s, FIXED if f else SETTLED)
                                  for t, s, f in zip(record.tokens, record.texts, fixed))
            self.committed_tokens += len(record.tokens)
            self.current = []
            self.last_step = None
            return
        previous = self.last_step
        pieces = []
        fixed = record.fixed or [False] * len(record.tokens)
        for i, (token, accepted, text) in enumerate(zip(record.tokens, record.accepted, record.texts)):
            if fixed[i]:
                pieces.append(_Piece(token, text, FIXED))
            elif not accepted:
                pieces.append(_Piece(token, NOISE_GLYPH, NOISE))
            elif previous is not None and previous.accepted[i] and previous.tokens[i] == token:
                pieces.append(_Piece(token, text, SETTLED))
            else:
                pieces.append(_Piece(token, text, NEW))
        self.current = pieces
        self.last_step = record

    # -- rendering ------------------------------------------------------------------------

    def split(self) -> tuple[Text, Text]:
        """(thoughts, answer) as styled Text, split at the thought channel's markers."""
        thoughts, answer = Text(), Text()
        pieces = self.committed + self.current
        where = channels.route([p.token for p in pieces], self.channel_ids, [p.style != NOISE for p in pieces])
        for piece, part in zip(pieces, where):
            if part is None:  # the channel's own markers
                continue
            target = thoughts if part == channels.THOUGHT else answer
            style = piece.style if target is answer or piece.style in (NEW, NOISE) else THOUGHT
            target.append(visible(piece.text), style=style or None)
        return thoughts[channels.label_length(thoughts.plain):], answer

    def header(self) -> Text:
        record = self.last_step
        if record is None:
            if isinstance(self.last, CanvasRecord):
                r = self.last
                return Text(f"canvas {r.canvas + 1}/{r.canvases} · committed after {r.steps} steps", style=HEADER)
            return Text("starting", style=HEADER)
        return Text(
            f"canvas {record.canvas + 1}/{record.canvases} · step {record.step}/{record.max_steps} · "
            f"T {record.temperature:.2f} · accepted {record.accepted_count}/{len(record.accepted)} · "
            + (f"fixed {record.fixed_count} · " if record.fixed else "")
            + f"H {record.mean_entropy:.2f}",
            style=HEADER,
        )

    def footer(self) -> Text:
        elapsed = self.last.elapsed if self.last is not None else 0.0
        settled = self.committed_tokens + (self.last_step.accepted_count if self.last_step else 0)
        rate = settled / elapsed if elapsed > 0 else 0.0
        return Text(f"{elapsed:.2f} s · {rate:.1f} tok/s", style=FOOTER)


class TailLines:
    """Render a renderable but keep only its last ``max_lines`` lines (the newest text)."""

    def __init__(self, renderable: RenderableType, max_lines: int):
        self.renderable = renderable
        self.max_lines = max(1, max_lines)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options.update(height=None), pad=False)
        for line in lines[-self.max_lines:]:
            yield from line
            yield Segment.line()


def render_state(state: DenoisingState, height: int | None = None) -> Group:
    """The whole frame: header, optional thought region, the text, footer."""
    thoughts, answer = state.split()
    parts: list[RenderableType] = [state.header()]
    budget = (height or 10_000) - 4
    if thoughts.plain.strip():
        parts.append(Panel(TailLines(thoughts, max(2, budget // 3)), title="thinking", title_align="left",
                           style="dim", border_style="dim"))
        budget -= max(2, budget // 3) + 2
    parts.append(TailLines(answer, max(1, budget)))
    parts.append(state.footer())
    return Group(*parts)


class LiveView:
    """A Rich Live view on ``console`` (stderr), redrawn at each step up to ``MAX_FPS`` times a
    second; committed canvases and the final state are always drawn."""

    def __init__(self, console: Console, channel_ids: Sequence[int] | None = None, max_fps: float = MAX_FPS):
        from rich.live import Live

        self.console = console
        self.state = DenoisingState(channel_ids=tuple(channel_ids) if channel_ids else None)
        self.min_interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self._last_draw = 0.0
        self._live = Live(console=console, auto_refresh=False, transient=False,
                          redirect_stdout=False, redirect_stderr=False, vertical_overflow="visible")

    def __enter__(self) -> LiveView:
        self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._draw()
        self._live.stop()

    def update(self, record: Record) -> None:
        self.state.update(record)
        now = time.perf_counter()
        if isinstance(record, CanvasRecord) or now - self._last_draw >= self.min_interval:
            self._draw()
            self._last_draw = now

    def _draw(self) -> None:
        self._live.update(render_state(self.state, self.console.height), refresh=True)


class PlainStepLog:
    """One plain line per record on ``stream`` (no ANSI)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def __enter__(self) -> PlainStepLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stream.flush()

    def update(self, record: Record) -> None:
        self.stream.write(plain_line(record) + "\n")


def step_view(console: Console, channel_ids: Sequence[int] | None, stream: IO[str]) -> LiveView | PlainStepLog:
    """The live view when ``console`` is a terminal, else the plain step log on ``stream``."""
    return LiveView(console, channel_ids) if console.is_terminal else PlainStepLog(stream)
