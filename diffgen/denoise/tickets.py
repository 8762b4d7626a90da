"""A batcher's requests and rows: the :class:`Ticket` a caller holds, the :class:`Row` s the
scheduler places in slots (or runs alone: a solo request's work, :data:`SoloWork`), the batch they
form, and the scheduler's :class:`Counters`.

The scheduler itself is :mod:`diffgen.denoise.batcher`; what a ticket's consumer receives,
:mod:`diffgen.denoise.items`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch

from diffgen.denoise.channels import split_response
from diffgen.denoise.events import Completion, CompletionStats, StepEvent, cut_completion
from diffgen.denoise.items import Canvas, Done, Item, Step
from diffgen.settings import GenerationSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from diffgen.denoise.step import StepState


@dataclass(frozen=True)
class Committed:
    """What a solo work yields after each canvas it committed (after that canvas's items): the
    decoder passes it took. The scheduler counts them, and stops the work there when its request
    was cancelled."""

    passes: int


SoloWork = Callable[[int], Iterable[Union[Item, Committed]]]
"""A request the batch step cannot share (:meth:`~diffgen.denoise.batcher.Batcher.submit_solo`):
called with a choice's index, it generates that choice alone, yielding the choice's items
(:class:`~diffgen.denoise.items.Step`, :class:`~diffgen.denoise.items.Canvas`,
:class:`~diffgen.denoise.items.Done`) and a :class:`Committed` after each canvas."""


@dataclass
class Counters:
    """The scheduler's running totals (read them with :meth:`~diffgen.denoise.batcher.Batcher.counters`).
    Solo requests count as requests and rows, and their decoder passes count in ``decoder_forwards``
    and ``row_forwards``; they form no batch and count no canvases or encoder passes.

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
        settings: one per row (row ``i`` is choice ``i``); empty for a solo request.
        put: the callback that receives the items (:mod:`diffgen.denoise.items`).
        observe: whether :class:`~diffgen.denoise.items.Step` items are wanted.
        work: a solo request's work (``None``: its rows are batched).
        submitted: ``time.perf_counter()`` when it was submitted.
        cancelled: set by :meth:`cancel`.
        ended: set once :class:`~diffgen.denoise.items.End` was delivered.
        started: whether it left the queue (a row started, or it was cancelled or failed waiting).
        open_rows: rows not ended yet.
        failed: whether an error ended it.
    """

    def __init__(self, cancel: Callable[[Ticket], None], put: Callable[[Item], None], rows: int,
                 on_start: Callable[[], None] | None, *, prompt: Sequence[int] = (),
                 settings: Sequence[GenerationSettings] = (), observe: bool = False, work: SoloWork | None = None):
        self.prompt = list(prompt)
        self.settings = list(settings)
        self.put = put
        self.observe = observe
        self.work = work
        self.submitted = time.perf_counter()
        self.cancelled = False
        self.ended = threading.Event()
        self._cancel = cancel  # the batcher's cancel
        self._on_start = on_start
        self.started = False
        self.open_rows = rows  # rows not ended yet
        self.failed = False

    def cancel(self) -> None:
        """Stop this request: waiting rows leave the queue now, running ones at the next boundary
        (a solo row after the canvas in progress)."""
        self._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request's :class:`~diffgen.denoise.items.End` was delivered (``False``
        if ``timeout`` passed first)."""
        return self.ended.wait(timeout)

    def notify_start(self) -> None:
        if self._on_start is not None:
            self._on_start()


@dataclass
class Row:
    """One row (choice) of a request, from the queue to its slot and its end (a solo request's
    rows: no settings, no slot, a key of their own so that no other row ever shares their turn)."""

    ticket: Ticket
    index: int
    settings: GenerationSettings | None
    canvases: int
    key: object
    done_canvases: int = 0
    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    forwards: int = 0
    started: float = 0.0
    ended: bool = False
    slot: int = -1

    def step_item(self, state: StepState, step: int, n_steps: int, temperature: float) -> Step:
        """This row's part of a batch's step state (its slot's tensors, copied) as its item."""
        part = slice(self.slot, self.slot + 1)
        return Step(self.index, StepEvent(
            canvas=self.done_canvases, canvases=self.canvases, step=step, max_steps=n_steps,
            temperature=temperature, accepted=state.accepted[part].clone(), draft=state.draft[part].clone(),
            canvas_tokens=state.canvas[part].clone(), token_entropy=state.entropy[part].clone(),
            mean_entropy=state.mean_entropy[part].clone(), finished=state.stopped[part].clone(),
            elapsed=time.perf_counter() - self.started))

    def canvas_item(self, tokenizer: PreTrainedTokenizerBase) -> Canvas:
        """The answer and thoughts of the canvases committed so far."""
        cut, _ = cut_completion(self.tokens, self.settings)
        response = split_response(tokenizer, cut)
        return Canvas(self.index, response.text, response.thoughts)

    def done_item(self, tokenizer: PreTrainedTokenizerBase, peak: int | None) -> Done:
        """The row's completion, with its own stats (``peak``: the accelerator's peak memory)."""
        tokens, reason = cut_completion(self.tokens, self.settings)
        response = split_response(tokenizer, tokens)
        seconds = time.perf_counter() - self.started
        stats = CompletionStats(
            prompt_tokens=len(self.ticket.prompt), new_tokens=len(tokens), canvases=self.done_canvases,
            steps_per_canvas=tuple(self.steps), tokens_per_forward=len(tokens) / max(self.forwards, 1),
            seconds=seconds, tokens_per_second=len(tokens) / seconds if seconds > 0 else 0.0,
            peak_memory_bytes=peak)
        return Done(self.index, Completion(response.text, response.thoughts, tuple(tokens), reason, stats))


@dataclass
class RunningBatch:
    """The rows denoised together now, the batch key and settings they share."""

    rows: list[Row]
    key: tuple
    settings: GenerationSettings
    pending: torch.Tensor | None = None  # (slots, C) committed canvas not encoded yet
