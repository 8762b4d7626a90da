"""A batcher's requests and rows: the :class:`Ticket` a caller holds, the :class:`Row` s the
scheduler places in slots, the batch they form, and the scheduler's :class:`Counters`.

The scheduler itself is :mod:`diffgen.denoise.batcher`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from diffgen.settings import GenerationSettings


@dataclass
class Counters:
    """The scheduler's running totals (read them with :meth:`~diffgen.denoise.batcher.Batcher.counters`).

    Attributes:
        requests_served: requests whose every row ended normally.
        requests_cancelled: requests cancelled before their end.
        requests_failed: requests ended by an error.
        rows_served: rows (choices) that ended normally.
        batches: batches formed (a batch runs from its first row until it drains).
        canvases: canvases denoised (one per batch and boundary, whatever its row count).
        decoder_forwards: decoder passes (each is one step of a whole batch).
        row_forwards: the sum over rows of the decoder passes they took part in (what running
            every row alone would have cost).
        encoder_forwards: encoder passes (new rows' prompts, committed canvases).
        rows_in_flight: rows in the running batch now.
        rows_queued: rows waiting for a slot now.
        requests_queued: requests none of whose rows has started yet.
    """

    requests_served: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    rows_served: int = 0
    batches: int = 0
    canvases: int = 0
    decoder_forwards: int = 0
    row_forwards: int = 0
    encoder_forwards: int = 0
    rows_in_flight: int = 0
    rows_queued: int = 0
    requests_queued: int = 0


class Ticket:
    """One submitted request. :meth:`cancel` it when its consumer goes away; :meth:`wait` for its end.

    Attributes:
        prompt: the prompt's token ids.
        settings: one per row (row ``i`` is choice ``i``).
        put: the callback that receives the items (see the module's docstring).
        observe: whether ``("step", ...)`` items are wanted.
        submitted: ``time.perf_counter()`` when it was submitted.
        cancelled: set by :meth:`cancel`.
        ended: set once ``("end",)`` was delivered.
        started: whether it left the queue (a row started, or it was cancelled or failed waiting).
        open_rows: rows not ended yet.
        failed: whether an error ended it.
    """

    def __init__(self, cancel: Callable[[Ticket], None], prompt: Sequence[int],
                 settings: Sequence[GenerationSettings], put: Callable[[tuple], None], observe: bool,
                 on_start: Callable[[], None] | None):
        self.prompt = list(prompt)
        self.settings = list(settings)
        self.put = put
        self.observe = observe
        self.submitted = time.perf_counter()
        self.cancelled = False
        self.ended = threading.Event()
        self._cancel = cancel  # the batcher's cancel
        self._on_start = on_start
        self.started = False
        self.open_rows = len(self.settings)  # rows not ended yet
        self.failed = False

    def cancel(self) -> None:
        """Stop this request: waiting rows leave the queue now, running ones at the next boundary."""
        self._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request's ``("end",)`` was delivered (``False`` if ``timeout`` passed first)."""
        return self.ended.wait(timeout)

    def notify_start(self) -> None:
        if self._on_start is not None:
            self._on_start()


@dataclass
class Row:
    """One row (choice) of a request, from the queue to its slot and its end."""

    ticket: Ticket
    index: int
    settings: GenerationSettings
    canvases: int
    key: tuple
    done_canvases: int = 0
    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    forwards: int = 0
    started: float = 0.0
    ended: bool = False
    slot: int = -1


@dataclass
class RunningBatch:
    """The rows denoised together now, the batch key and settings they share."""

    rows: list[Row]
    key: tuple
    settings: GenerationSettings
    pending: torch.Tensor | None = None  # (slots, C) committed canvas not encoded yet
