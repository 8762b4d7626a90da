"""What a generation hands its HTTP response, one typed item at a time (consumers match on the type).

A request's items, from the batcher's thread or a serial worker: :class:`Step` after every
denoising step (only when its steps are streamed), :class:`Canvas` after each committed canvas of
a choice, :class:`Done` at each choice's end, :class:`Failed` if the generation failed, and
always last :class:`End`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from diffgen.denoise.loop import StepEvent
    from diffgen.server.answers import Choice


@dataclass(frozen=True)
class Step:
    """One denoising step of choice ``index`` (the event's tensors are this choice's alone)."""

    index: int
    event: StepEvent


@dataclass(frozen=True)
class Canvas:
    """Choice ``index`` committed a canvas: its answer and thoughts so far (``thoughts``: ``None``
    when no thought channel opened)."""

    index: int
    text: str
    thoughts: str | None


@dataclass(frozen=True)
class Done:
    """Choice ``index`` ended."""

    index: int
    choice: Choice


@dataclass(frozen=True)
class Failed:
    """The generation failed (an :class:`End` follows)."""

    error: BaseException


@dataclass(frozen=True)
class End:
    """The request's last item."""


Item = Union[Step, Canvas, Done, Failed, End]
