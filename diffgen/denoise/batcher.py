"""Continuous batching: requests that arrive together are denoised together, as rows of one batch.

A :class:`Batcher` owns one scheduler thread. :meth:`Batcher.submit` queues a request (one
prompt, one :class:`~diffgen.settings.GenerationSettings` per row: ``n`` choices are ``n``
rows) and returns a :class:`Ticket`; the scheduler hands the request's items to the ticket's
``put`` callback as they happen (on the scheduler thread, so the callback must be quick):

* ``("step", index, StepEvent)`` after every denoising step, only for tickets submitted with
  ``observe=True`` (the event is this row's alone: every tensor has batch dimension 1);
* ``("canvas", index, text, thoughts)`` after each committed canvas of row ``index``;
* ``("done", index, Completion)`` when row ``index`` ends (its stats are its own);
* ``("error", exception)`` if the batch failed or the request could not join it, then, always
  last, ``("end",)``.

No HTTP here: :mod:`diffgen.server.app` is one user; a test or a batch job could be another.

How it batches (and why):

* **Canvas boundaries.** All rows of a batch start a canvas together and step together; the
  batch only changes between canvases. There the scheduler (1) drops rows that ended (EOS or
  their own ``max_new_tokens``) or were cancelled, with ``index_select`` on the KV cache's batch
  dimension; (2) encodes the last committed canvas of the rows that stay (one encoder pass);
  (3) trims cache columns that are padding for every row left; (4) admits waiting rows, up to
  ``max_batch``. A row that joins is left-padded to the batch's cache length and encoded into a
  fresh cache, which is concatenated to the batch's along the batch dimension; a prompt longer
  than the batch's cache grows the batch's cache on the left with masked columns instead of
  waiting for the batch to drain, so no prompt waits for a length reason. (The cache surgery
  below reads the tensors of transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer``:
  transformers offers ``batch_select_indices`` but no concatenation or left padding; sliding
  layers keep the last ``window - 1`` columns, and padding is always on the left, so every row
  of a batch has the same stored length and the same ``cumulative_length``.)
* **Per-row positions.** Each row's position ids count its own tokens from 0 (padding does not
  move them), so a row's rotary angles are those it would have alone, whichever batch it joins.
* **Only the fast sampler batches.** :class:`~diffgen.denoise.sampling.FastSampler` draws from
  counter-based noise keyed by (row seed, row's canvas, step): a row's random numbers do not
  depend on its neighbours or on when it joined (``canvas_index`` is per row here). The exact
  sampler draws from one global generator in the reference's order, so exact requests run
  alone, through the server's serial path.
* **Settings that act on the whole step are shared.** Steps, temperatures, entropy bound and
  adaptive stopping are batch-wide in :class:`~diffgen.denoise.step.StepContext`; a row only
  joins a batch whose :func:`batch_key` equals its own. Seeds and ``max_new_tokens`` are per
  row. Admission is first come, first served across keys: the scheduler admits waiting rows in
  arrival order and stops at the first one that needs another key, so that row is served as
  soon as the running batch drains, and nothing that arrived later overtakes it (no starvation).
* **A batch of one is** :func:`~diffgen.denoise.loop.stream`: same encoder and decoder calls,
  same positions and masks, same sampler, same steps, so the same tokens. A row batched with
  others got the very tokens it gets alone in every case measured on the CPU (torch 2.13, one
  and two threads, the tiny test checkpoint and a 256-wide random model, rows joining and
  leaving, adaptive stopping); on a GPU the matmul kernels picked for another batch size may
  round differently, so there it is expected but not promised (not measured here).
* **Costs.** A joining row's prompt is encoded padded to the batch's length (the padded columns
  cost encoder work, not attention: they are masked), and every row attends over the batch's
  longest sequence; trimming keeps that at the longest row still in the batch.
* **Cancellation** (:meth:`Ticket.cancel`, or a consumer whose ``put`` raises): waiting rows
  leave the queue at once (a request with ``n`` rows may have some running, some waiting); a
  running row is dropped at the next boundary and its slot goes to the next waiting row. A
  canvas whose every row is cancelled stops early: the step loop looks at the (host-side)
  cancel flags every ``FAST_CHECK_EVERY`` steps, so a request with many steps per canvas does
  not hold the model after its client left.
* **Failures.** A failure while denoising fails every row of the batch (each request gets
  ``("error", exception)``); a failure while encoding newcomers' prompts fails the newcomers'
  requests only: they are encoded into a cache of their own before the batch's is touched.
* **One model, one lock.** Every device operation (a boundary's cache work, a canvas's steps)
  runs under ``lock``, which the server shares with its serial path (so no other thread touches
  the device while a step is recorded as a CUDA graph); it is released between canvases, so an
  exact request waiting for the lock runs between two canvases of a batch.

``hold`` is a test hook: while it returns true the scheduler waits at the next boundary (it
still drops cancelled rows and admits waiting ones there), which makes queue states
reproducible without timing. ``diffgen serve`` wires it to the file named by
``DIFFGEN_SERVE_HOLD`` (:func:`file_hold`; tests only).
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import logging
import math
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from diffgen.denoise.channels import split_response
from diffgen.denoise.loop import (
    FAST_CHECK_EVERY,
    CompletionStats,
    Completion,
    StepEvent,
    _commit,
    _graphs_enabled,
    cache_keyword,
    cut_completion,
    encode,
)
from diffgen.denoise.sampling import FastSampler, TemperatureSchedule, entropy_bound_acceptance
from diffgen.denoise.step import Decoder, GraphedSteps, StepContext, clone_state, denoise_step, initial_state
from diffgen.errors import UsageError
from diffgen.settings import SEED_LIMIT, GenerationSettings

if TYPE_CHECKING:
    from diffgen.loading.loader import LoadedModel

_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # A scheduler thread still alive while the interpreter finalises aborts the process ("terminate
    # called without an active exception", from torch's threads): stop and join them first.
    for batcher in list(_LIVE):
        batcher.close(wait=True)


#: How often a held scheduler looks at its ``hold`` hook again (seconds between looks, not a deadline).
HOLD_POLL = 0.02


def file_hold(path: str) -> Callable[[], bool]:
    """A ``hold`` hook read from a file (tests): no file, run; a file holding a number ``N > 0``,
    run one canvas and write ``N - 1``; any other content (``0``, empty), wait at the boundary."""
    from pathlib import Path

    file = Path(path)

    def hold() -> bool:
        try:
            text = file.read_text().strip()
        except FileNotFoundError:
            return False
        if not text.isdigit() or int(text) <= 0:
            return True
        file.write_text(str(int(text) - 1))
        return False

    return hold


def batch_key(settings: GenerationSettings) -> tuple:
    """What rows of one batch must share: every setting that acts on the whole step."""
    return (settings.max_denoising_steps, settings.entropy_bound, settings.t_min, settings.t_max,
            settings.stability_threshold if settings.adaptive_stopping else None,
            settings.confidence_threshold if settings.adaptive_stopping else None,
            tuple(settings.eos_token_ids), settings.pad_token_id)


@dataclass
class Counters:
    """The scheduler's running totals (read them with :meth:`Batcher.counters`).

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
    """

    def __init__(self, batcher: Batcher, prompt: Sequence[int], settings: Sequence[GenerationSettings],
                 put: Callable[[tuple], None], observe: bool, on_start: Callable[[], None] | None):
        self.prompt = list(prompt)
        self.settings = list(settings)
        self.put = put
        self.observe = observe
        self.submitted = time.perf_counter()
        self.cancelled = False
        self.ended = threading.Event()
        self._batcher = batcher
        self._on_start = on_start
        self._started = False
        self._open = len(self.settings)  # rows not ended yet
        self._failed = False

    def cancel(self) -> None:
        """Stop this request: waiting rows leave the queue now, running ones at the next boundary."""
        self._batcher.cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request's ``("end",)`` was delivered (``False`` if ``timeout`` passed first)."""
        return self.ended.wait(timeout)

    def _notify_start(self) -> None:
        if self._on_start is not None:
            self._on_start()


@dataclass
class _Row:
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


@dataclass
class _Running:
    rows: list[_Row]
    key: tuple
    settings: GenerationSettings
    cache: Any
    mask: torch.Tensor  # (B, L) bool: real tokens in the cache
    lengths: list[int]  # real tokens per row in the cache
    pending: torch.Tensor | None = None  # (B, C) committed canvas not encoded yet


@dataclass
class _Joining:
    """Rows about to join a batch, encoded on their own (see :meth:`Batcher._encode_new`).

    Attributes:
        cache: their KV cache, left-padded to the joined batch's length.
        mask: ``(B, L)`` bool, their real tokens in ``cache``.
        lengths: real tokens per row (their prompt lengths).
    """

    cache: Any
    mask: torch.Tensor
    lengths: list[int]


class Batcher:
    """Continuous batching over one loaded model (see the module's docstring).

    Args:
        loaded: the :class:`~diffgen.loading.loader.LoadedModel`.
        max_batch: rows denoised together at most (1: one row at a time, in arrival order).
        lock: held around every model call (default: a lock of its own); share it with any
            other code that runs the model.
        hold: test hook, ``() -> bool``: while true the scheduler waits at the next boundary.
        graphs: replay each canvas's step from a CUDA graph (default: on CUDA unless
            ``DIFFGEN_CUDA_GRAPHS=0``, as in the loop).
        capture: replaces the CUDA graph recorder (tests replay eagerly on the CPU).
    """

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 8, lock: Any = None,
                 hold: Callable[[], bool] | None = None, graphs: bool | None = None, capture: Any = None):
        if max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, got {max_batch}")
        self.loaded = loaded
        self.max_batch = max_batch
        self.lock = lock if lock is not None else threading.Lock()
        self.hold = hold
        model = loaded.model
        self.device = model.device
        self.graphs = (self.device.type == "cuda" and _graphs_enabled()) if graphs is None else graphs
        if self.graphs and self.device.type != "cuda" and capture is None:
            raise UsageError("CUDA graphs need a CUDA device")
        self.capture = capture
        self.canvas_length = int(model.config.canvas_length)
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.embed_dtype = model.model.decoder.embed_tokens.weight.dtype
        self._cache_kw = cache_keyword(model)
        self._masked_first_step = "self_conditioning_mask" in inspect.signature(
            type(model.model.decoder).forward).parameters
        self._cond = threading.Condition()
        self._queue: deque[_Row] = deque()
        self._counters = Counters()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._admitting: list[_Row] = []
        _LIVE.add(self)

    # -- the caller's side ------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], settings: Sequence[GenerationSettings], put: Callable[[tuple], None],
               *, observe: bool = False, on_start: Callable[[], None] | None = None) -> Ticket:
        """Queue one request: ``prompt`` token ids, one settings per row (each with its seed; a
        random one where it is ``None``).

        ``on_start`` is called once, on the scheduler thread, when the request leaves the queue
        (its first row starts, or it was cancelled or failed while waiting).
        """
        if not prompt:
            raise UsageError("every prompt needs at least one token")
        if not settings:
            raise UsageError("a request needs at least one row")
        # A row without a seed gets a random one (as the loop does), never one shared with its neighbours.
        settings = [row if row.seed is not None else dataclasses.replace(row, seed=secrets.randbelow(SEED_LIMIT))
                    for row in settings]
        ticket = Ticket(self, prompt, settings, put, observe, on_start)
        rows = [_Row(ticket=ticket, index=index, settings=row, key=batch_key(row),
                     canvases=math.ceil(row.max_new_tokens / self.canvas_length))
                for index, row in enumerate(settings)]
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.extend(rows)
            self._counters.rows_queued += len(rows)
            self._counters.requests_queued += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="diffgen-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.cancelled or ticket.ended.is_set():
                return
            ticket.cancelled = True
            waiting, starting = self._unqueue(ticket)
            self._cond.notify_all()
        if starting:
            ticket._notify_start()
        # Rows taken out of the queue end here; rows already running end at the next boundary.
        for row in waiting:
            self._row_closed(row, served=False)

    def _unqueue(self, ticket: Ticket) -> tuple[list[_Row], bool]:
        """Take a ticket's waiting rows out of the queue (hold ``_cond``): the rows removed, and
        whether this left the ticket's queue (none of its rows had started; it counts as started now)."""
        waiting = [row for row in self._queue if row.ticket is ticket]
        if waiting:
            self._queue = deque(row for row in self._queue if row.ticket is not ticket)
            self._counters.rows_queued -= len(waiting)
        if ticket._started:
            return waiting, False
        ticket._started = True
        self._counters.requests_queued -= 1
        return waiting, True

    def counters(self) -> Counters:
        """A snapshot of the running totals."""
        with self._cond:
            return Counters(**vars(self._counters))

    def close(self, wait: bool = False) -> None:
        """Stop the scheduler after the canvas in progress (requests still queued never end);
        ``wait``: until its thread has ended."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the scheduler thread ---------------------------------------------------------------

    def _serve(self) -> None:
        run: _Running | None = None
        while True:
            with self._cond:
                while run is None and not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                with self.lock:  # every device operation of the batcher runs under the model's lock
                    run = self._boundary(run)
                if run is None:
                    continue
                if self.hold is not None and self.hold():
                    with self._cond:
                        self._cond.wait(HOLD_POLL)
                    continue
                self._denoise(run)
            except BaseException as exc:  # noqa: BLE001 - every row of the batch gets it; the scheduler goes on
                rows = (run.rows if run is not None else []) + getattr(self, "_admitting", [])
                self._admitting = []
                for ticket in dict.fromkeys(row.ticket for row in rows):
                    self._fail(ticket, exc)
                run = None
                self._set_in_flight(0)

    def _set_in_flight(self, rows: int) -> None:
        with self._cond:
            self._counters.rows_in_flight = rows

    def _boundary(self, run: _Running | None) -> _Running | None:
        """Between two canvases: drop, encode, trim, admit (see the module's docstring). Call it
        holding ``lock``."""
        if run is not None:
            keep = [i for i, row in enumerate(run.rows) if not row.ended and not row.ticket.cancelled]
            dropped = [row for i, row in enumerate(run.rows) if i not in set(keep)]
            for row in dropped:
                if not row.ended:  # cancelled while running
                    self._row_closed(row, served=False)
            if not keep:
                run = None
            elif len(keep) < len(run.rows):
                self._select(run, keep)
        if run is not None and run.pending is not None:
            self._encode_pending(run)
        if run is not None:
            self._trim(run)
        free = self.max_batch - (len(run.rows) if run is not None else 0)
        taken = self._take(run.key if run is not None else None, free) if free > 0 else []
        if taken:
            # The newcomers' prompts are encoded into a cache of their own first: if that fails
            # (a prompt too long for the memory left, say), only their requests fail and the
            # running batch goes on untouched. The batch's cache changes only after it succeeded.
            self._admitting = taken
            try:
                joining = self._encode_new(run, taken)
            except Exception as exc:  # noqa: BLE001 - reported to the admitting requests alone
                self._admitting = []
                for ticket in dict.fromkeys(row.ticket for row in taken):
                    self._fail(ticket, exc)
            else:
                run = self._join(run, taken, joining)
                self._admitting = []
        self._set_in_flight(len(run.rows) if run is not None else 0)
        return run

    def _take(self, key: tuple | None, free: int) -> list[_Row]:
        """Waiting rows to admit: in arrival order, up to ``free``, stopping at another key."""
        taken: list[_Row] = []
        with self._cond:
            while self._queue and len(taken) < free:
                row = self._queue[0]
                key = row.key if key is None else key
                if row.key != key:
                    break
                taken.append(self._queue.popleft())
            self._counters.rows_queued -= len(taken)
            starting = list(dict.fromkeys(row.ticket for row in taken if not row.ticket._started))
            for ticket in starting:
                ticket._started = True
            self._counters.requests_queued -= len(starting)
        for ticket in starting:
            ticket._notify_start()
        return taken

    def _positions(self, lengths: Sequence[int], total: int, width: int) -> torch.Tensor:
        """Per-row position ids ``(B, width)`` int32 of the last ``width`` columns of a ``total``-column
        left-padded sequence whose row ``r`` holds ``lengths[r]`` real tokens (padding gets 0)."""
        first = torch.tensor([length - total for length in lengths], dtype=torch.int32, device=self.device)
        columns = torch.arange(total - width, total, dtype=torch.int32, device=self.device)
        return (first[:, None] + columns[None]).clamp_(min=0)

    def _encode_new(self, run: _Running | None, rows: list[_Row]) -> _Joining:
        """Encode ``rows``' prompts, left-padded to the length the batch will have, into a fresh
        cache. ``run`` is only read."""
        from transformers import DynamicCache

        model = self.loaded.model
        longest = max(len(row.ticket.prompt) for row in rows)
        total = longest if run is None else max(run.mask.shape[1], longest)
        pad = rows[0].settings.pad_token_id
        prompts = [row.ticket.prompt for row in rows]
        ids = torch.tensor([[pad] * (total - len(p)) + p for p in prompts], dtype=torch.long, device=self.device)
        mask = torch.tensor([[False] * (total - len(p)) + [True] * len(p) for p in prompts], dtype=torch.bool,
                            device=self.device)
        lengths = [len(p) for p in prompts]
        positions = self._positions(lengths, total, total)
        if run is None and all(length == total for length in lengths):
            positions = positions[:1]  # the loop's (1, L) positions: a batch of one is stream() exactly
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        if run is None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        encode(model, ids, mask, positions, cache, self._cache_kw)
        with self._cond:
            self._counters.encoder_forwards += 1
        return _Joining(cache=cache, mask=mask, lengths=lengths)

    def _join(self, run: _Running | None, rows: list[_Row], joining: _Joining) -> _Running:
        """Make ``rows`` (encoded by :meth:`_encode_new`) a batch, or add them to ``run``."""
        now = time.perf_counter()
        for row in rows:
            row.started = now
        if run is None:
            with self._cond:
                self._counters.batches += 1
            return _Running(rows=list(rows), key=rows[0].key, settings=rows[0].settings, cache=joining.cache,
                            mask=joining.mask, lengths=joining.lengths)
        grow = joining.mask.shape[1] - run.mask.shape[1]
        if grow > 0:  # a prompt longer than the batch's cache: grow it on the left with masked columns
            cache_left_pad(run.cache, grow)
            run.mask = torch.nn.functional.pad(run.mask, (grow, 0), value=False)
        cache_concat(run.cache, joining.cache)
        run.rows.extend(rows)
        run.mask = torch.cat([run.mask, joining.mask], dim=0)
        run.lengths.extend(joining.lengths)
        return run

    def _select(self, run: _Running, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        run.cache.batch_select_indices(index)
        run.rows = [run.rows[i] for i in keep]
        run.mask = run.mask.index_select(0, index)
        run.lengths = [run.lengths[i] for i in keep]
        if run.pending is not None:
            run.pending = run.pending.index_select(0, index)

    def _encode_pending(self, run: _Running) -> None:
        length = self.canvas_length
        mask = torch.nn.functional.pad(run.mask, (0, length), value=True)
        total = mask.shape[1]
        lengths = [n + length for n in run.lengths]
        positions = self._positions(lengths, total, length)
        if len(run.rows) == 1 or len(set(lengths)) == 1:
            positions = positions[:1]
        encode(self.loaded.model, run.pending, mask, positions, run.cache, self._cache_kw)
        run.mask, run.lengths, run.pending = mask, lengths, None
        with self._cond:
            self._counters.encoder_forwards += 1

    def _trim(self, run: _Running) -> None:
        columns = run.mask.shape[1] - max(run.lengths)
        if columns > 0:
            cache_trim_left(run.cache, columns)
            run.mask = run.mask[:, columns:]

    def _denoise(self, run: _Running) -> None:
        """One canvas of every row of ``run``: steps, commit, deliveries."""
        model = self.loaded.model
        settings = run.settings
        rows = run.rows
        batch, length, device = len(rows), self.canvas_length, self.device
        n_steps = settings.max_denoising_steps
        observed = [r for r, row in enumerate(rows) if row.ticket.observe and not row.ticket.cancelled]
        schedule = TemperatureSchedule(settings.t_min, settings.t_max, n_steps)
        with self.lock:
            seeds = torch.tensor([row.settings.seed for row in rows], dtype=torch.long, device=device)
            sampler = FastSampler(self.vocab_size, length, seeds, self.softcap)
            temperatures = schedule(torch.arange(n_steps, 0, -1, dtype=torch.int32, device=device))
            eos = torch.tensor(settings.eos_token_ids, device=device)
            finished = torch.zeros(batch, dtype=torch.bool, device=device)
            canvas_index = torch.tensor([row.done_canvases for row in rows], dtype=torch.long, device=device)
            canvas = sampler.initial_canvas(batch, ~finished, canvas_index)
            total = run.mask.shape[1] + length
            decoder_attention_mask = torch.nn.functional.pad(run.mask, (0, length), value=True)
            positions = self._positions([n + length for n in run.lengths], total, length)
            if batch == 1 or len(set(run.lengths)) == 1:
                positions = positions[:1]
            decoder_mask = model.model.decoder.create_diffusion_decoder_attention_mask(
                model.config, canvas.unsqueeze(-1), run.cache, decoder_attention_mask)
            context = StepContext(
                decoder=Decoder(model, run.cache, decoder_mask, positions), sampler=sampler,
                temperatures=temperatures, accept=entropy_bound_acceptance(settings.entropy_bound),
                stability=settings.stability_window,
                confidence=settings.confidence_threshold, finished=finished, canvas_index=canvas_index,
                embed_dtype=self.embed_dtype)
            state = initial_state(context, canvas, torch.zeros(batch, dtype=torch.int, device=device))
            runner = None
            if self.graphs:
                runner = GraphedSteps(warmup_key=(str(device), batch, id(model)), capture=self.capture,
                                      masked_first_step=self._masked_first_step)
                runner.begin_canvas()
            steps = 0
            try:
                for remaining in range(n_steps, 0, -1):
                    steps += 1
                    state = runner.step(state, context) if runner is not None else denoise_step(state, context)
                    if observed:
                        shown = clone_state(state) if runner is not None else state
                        self._deliver_steps(rows, observed, shown, steps, n_steps, schedule.value(remaining))
                    if steps % FAST_CHECK_EVERY == 0 and all(row.ticket.cancelled for row in rows):
                        break  # nobody wants this canvas any more (host-side flags: no device sync)
                    if (steps % FAST_CHECK_EVERY == 0 or remaining == 1) and bool(state.stopped.all()):
                        break
                committed, ended_now = _commit(state.argmax, finished, eos, settings.pad_token_id)
                tokens, ended, forwards = committed.tolist(), ended_now.tolist(), state.forwards.tolist()
            finally:
                if runner is not None:
                    runner.begin_canvas()
        with self._cond:
            self._counters.canvases += 1
            self._counters.decoder_forwards += steps
            self._counters.row_forwards += sum(forwards)
        run.pending = committed
        still = sum(1 for r, row in enumerate(rows) if not (ended[r] or row.done_canvases + 1 >= row.canvases
                                                            or row.ticket.cancelled))
        self._set_in_flight(still)
        for r, row in enumerate(rows):
            row.tokens.extend(tokens[r])
            row.steps.append(forwards[r])
            row.forwards += forwards[r]
            row.done_canvases += 1
            if row.ticket.cancelled:
                continue
            if ended[r] or row.done_canvases >= row.canvases:
                row.ended = True
                self._row_done(row)
            else:
                cut, _ = cut_completion(row.tokens, row.settings)
                response = split_response(self.loaded.tokenizer, cut)
                self._put(row.ticket, ("canvas", row.index, response.text, response.thoughts))

    def _deliver_steps(self, rows: list[_Row], observed: list[int], state: Any, step: int, n_steps: int,
                       temperature: float) -> None:
        for r in observed:
            row = rows[r]
            if row.ticket.cancelled:
                continue
            part = slice(r, r + 1)
            event = StepEvent(
                canvas=row.done_canvases, canvases=row.canvases, step=step, max_steps=n_steps,
                temperature=temperature, accepted=state.accepted[part].clone(), draft=state.argmax[part].clone(),
                canvas_tokens=state.canvas[part].clone(), token_entropy=state.entropy[part].clone(),
                mean_entropy=state.mean_entropy[part].clone(), finished=state.stopped[part].clone(),
                elapsed=time.perf_counter() - row.started)
            self._put(row.ticket, ("step", row.index, event))

    def _row_done(self, row: _Row) -> None:
        tokens, reason = cut_completion(row.tokens, row.settings)
        response = split_response(self.loaded.tokenizer, tokens)
        seconds = time.perf_counter() - row.started
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        stats = CompletionStats(
            prompt_tokens=len(row.ticket.prompt), new_tokens=len(tokens), canvases=row.done_canvases,
            steps_per_canvas=tuple(row.steps), tokens_per_forward=len(tokens) / max(row.forwards, 1),
            seconds=seconds, tokens_per_second=len(tokens) / seconds if seconds > 0 else 0.0,
            peak_memory_bytes=peak)
        self._put(row.ticket, ("done", row.index, Completion(response.text, response.thoughts, tuple(tokens), reason,
                                                      stats)))
        self._row_closed(row, served=True)

    def _row_closed(self, row: _Row, *, served: bool) -> None:
        """One row of a ticket is over; the ticket ends with its last row."""
        ticket = row.ticket
        with self._cond:
            if served:
                self._counters.rows_served += 1
            ticket._open -= 1
            last = ticket._open == 0 and not ticket.ended.is_set()
            if last:
                if ticket.cancelled:
                    self._counters.requests_cancelled += 1
                else:
                    self._counters.requests_served += 1
        if last:
            self._end(ticket)

    def _put(self, ticket: Ticket, item: tuple) -> None:
        """Hand ``item`` to the ticket's consumer; a consumer that raises is treated as gone."""
        try:
            ticket.put(item)
        except Exception:  # noqa: BLE001 - the consumer's failure must not stop the batch
            logging.getLogger("diffgen.batcher").exception("diffgen: a request's consumer failed; request cancelled")
            self.cancel(ticket)  # its waiting rows leave the queue too, as on any cancel

    def _end(self, ticket: Ticket) -> None:
        try:
            self._put(ticket, ("end",))
        finally:
            ticket.ended.set()

    def _fail(self, ticket: Ticket, exc: BaseException) -> None:
        with self._cond:
            if ticket.ended.is_set() or ticket._failed:
                return
            ticket._failed = True
            # A request its consumer had cancelled already ends as cancelled, not as failed.
            if ticket.cancelled:
                self._counters.requests_cancelled += 1
            else:
                self._counters.requests_failed += 1
            ticket.cancelled = True  # its other rows stop too
            _, starting = self._unqueue(ticket)
            ticket._open = 0
        if starting:
            ticket._notify_start()
        try:
            self._put(ticket, ("error", exc))
        finally:
            self._end(ticket)


# -- KV cache surgery on transformers' dynamic caches ------------------------------------------------


def _layers(cache: Any) -> list[Any]:
    from transformers.cache_utils import DynamicLayer

    layers = list(cache.layers)
    for layer in layers:
        if not isinstance(layer, DynamicLayer) or getattr(layer, "record_past", False):
            raise TypeError(f"continuous batching needs transformers' dynamic cache layers, got "
                            f"{type(layer).__name__}")
    return layers


def _sliding(layer: Any) -> bool:
    return hasattr(layer, "cumulative_length") and hasattr(layer, "sliding_window")


def cache_concat(cache: Any, other: Any) -> None:
    """Append ``other``'s rows to ``cache`` (in place). Both hold the same sequence length."""
    for mine, theirs in zip(_layers(cache), _layers(other), strict=True):
        if not theirs.is_initialized:
            continue
        if mine.keys.shape[-2] != theirs.keys.shape[-2] or (
                _sliding(mine) and mine.cumulative_length != theirs.cumulative_length):
            raise ValueError("caches of different lengths cannot be concatenated")
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)


def cache_left_pad(cache: Any, columns: int) -> None:
    """Prepend ``columns`` zero (to be masked) columns to every row's sequence (in place)."""
    for layer in _layers(cache):
        if not layer.is_initialized:
            continue
        stored = layer.keys.shape[-2]
        if _sliding(layer):
            layer.cumulative_length += columns
            add = min(layer.cumulative_length, layer.sliding_window - 1) - stored
        else:
            add = columns
        if add > 0:
            shape = (*layer.keys.shape[:2], add, layer.keys.shape[-1])
            layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=-2)
            layer.values = torch.cat([layer.values.new_zeros(shape), layer.values], dim=-2)


def cache_trim_left(cache: Any, columns: int) -> None:
    """Drop the first ``columns`` columns of every row's sequence (in place; padding only)."""
    for layer in _layers(cache):
        if not layer.is_initialized:
            continue
        stored = layer.keys.shape[-2]
        if _sliding(layer):
            drop = max(0, columns - (layer.cumulative_length - stored))
            layer.cumulative_length -= columns
        else:
            drop = columns
        if drop > 0:
            layer.keys = layer.keys[:, :, drop:]
            layer.values = layer.values[:, :, drop:]
