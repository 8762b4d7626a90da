"""What a request's consumer receives from the batcher, one typed item at a time (consumers match on the type).

A request's items, handed to its ``put`` callback on the scheduler thread
(:mod:`diffgen.denoise.batcher`), whether its rows were batched or it ran alone: :class:`Step`
after every denoising step (only for requests that observe their steps), :class:`Canvas` after a
committed canvas of a choice, :class:`Done` at each choice's end, :class:`Failed` if the
generation failed, and always last :class:`End`. The server (:mod:`diffgen.server.streaming`)
turns them into server-sent events or collected choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from diffgen.denoise.events import Completion, StepEvent


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
    """Choice ``index`` ended: its :class:`~diffgen.denoise.events.Completion` (``stats`` is
    ``None`` for a json_schema answer, see :func:`diffgen.denoise.solo.schema_items`)."""

    index: int
    completion: Completion


@dataclass(frozen=True)
class Failed:
    """The generation failed (an :class:`End` follows)."""

    error: BaseException


@dataclass(frozen=True)
class End:
    """The request's last item."""


Item = Union[Step, Canvas, Done, Failed, End]
