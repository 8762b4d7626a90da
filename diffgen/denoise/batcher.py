"""Continuous batching: requests that arrive together are denoised together, as rows of one batch.

Its requests, rows and their items are :mod:`diffgen.denoise.tickets`, its cache work
:mod:`diffgen.denoise.backends` / :mod:`diffgen.denoise.kv`, its solo work :mod:`diffgen.denoise.solo`.

A :class:`Batcher` owns one scheduler thread, the only one that runs the model for it.
:meth:`Batcher.submit` queues a request whose rows the batch step can share (one prompt, one
:class:`~diffgen.settings.GenerationSettings` per row: ``n`` choices are ``n`` rows),
:meth:`Batcher.submit_solo` one it cannot (run alone). Each returns a :class:`Ticket`; the
scheduler hands the request's typed items (:mod:`diffgen.denoise.items`) to the ticket's ``put``
callback, on the scheduler thread (so the callback must be quick): ``Step`` after every step with
``observe=True`` (this row's tensors alone), ``Canvas`` after a committed canvas (a batched row's
last comes with its ``Done``), ``Done`` when a row ends (stats its own), ``Failed`` if it failed,
then always ``End``.

No HTTP here: :mod:`diffgen.server.engine` is one user; a test or a batch job could be another.

How it batches, and why (canvas boundaries, per-row positions, why only the fast sampler
batches, shared settings and first-come-first-served admission, solo requests, costs,
cancellation, failures, one lock): docs/architecture.md, "Continuous batching".
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from diffgen.denoise.backends import StaticBackend
from diffgen.denoise.fused import fusable
from diffgen.denoise.kv import bucket
from diffgen.denoise.items import End, Failed, Item
from diffgen.denoise.runner import FAST_CHECK_EVERY, CanvasRunner, commit_canvas, graphs_enabled, graphs_supported
from diffgen.denoise.sampling import TemperatureSchedule
from diffgen.denoise.step import StepState, clone_state
from diffgen.denoise.tickets import Committed, Counters, Row, RunningBatch, SoloWork, Ticket
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


def batch_key(settings: GenerationSettings) -> tuple:
    """What rows of one batch must share: every setting that acts on the whole step."""
    return (settings.max_denoising_steps, settings.entropy_bound, settings.t_min, settings.t_max,
            settings.stability_threshold if settings.adaptive_stopping else None,
            settings.confidence_threshold if settings.adaptive_stopping else None,
            tuple(settings.eos_token_ids), settings.pad_token_id)


class Batcher:
    """Continuous batching over one loaded model (see the module's docstring).

    Args:
        loaded: the :class:`~diffgen.loading.loader.LoadedModel`.
        max_batch: rows denoised together at most (1: one row at a time, in arrival order).
        lock: held around every model call (default: a lock of its own); share it with any
            other code that runs the model.
        graphs: replay each canvas's step from a CUDA graph (default: on CUDA unless
            ``DIFFGEN_CUDA_GRAPHS=0``, as in the loop).
    """

    def __init__(self, loaded: LoadedModel, *, max_batch: int = 8, lock: AbstractContextManager | None = None,
                 graphs: bool | None = None):
        if max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, got {max_batch}")
        self.loaded = loaded
        self.max_batch = max_batch
        self.lock = lock if lock is not None else threading.Lock()
        model = loaded.model
        self.device = model.device
        self.graphs = (self.device.type == "cuda" and graphs_enabled()) if graphs is None else graphs
        if self.graphs and not graphs_supported(self.device):
            raise UsageError("CUDA graphs need a CUDA device")
        self.canvas_length = int(model.config.canvas_length)
        self.runner: CanvasRunner | None = None  # built at the first batch (see _runner_for)
        self._cond = threading.Condition()
        self._queue: deque[Row] = deque()
        self._counters = Counters()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._admitting: list[Row] = []
        _LIVE.add(self)

    # -- the caller's side ------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], settings: Sequence[GenerationSettings], put: Callable[[Item], None],
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
        if not fusable(self.loaded.model):
            raise UsageError("continuous batching runs diffgen's fused passes, which need the whole model on one "
                             "device", "run without --offload, or one request at a time")
        # A row without a seed gets a random one (as the loop does), never one shared with its neighbours.
        settings = [row if row.seed is not None else dataclasses.replace(row, seed=secrets.randbelow(SEED_LIMIT))
                    for row in settings]
        ticket = Ticket(self.cancel, put, len(settings), on_start, prompt=prompt, settings=settings, observe=observe)
        return self._queued(ticket, [Row(ticket=ticket, index=index, settings=row, key=batch_key(row),
                                         canvases=math.ceil(row.max_new_tokens / self.canvas_length))
                                     for index, row in enumerate(settings)])

    def submit_solo(self, work: SoloWork, choices: int, put: Callable[[Item], None], *,
                    on_start: Callable[[], None] | None = None) -> Ticket:
        """Queue one request that runs alone: ``work(i)`` generates choice ``i`` (``choices`` of
        them, one after the other) once the request reaches the head of the queue and the
        running batch has drained. ``on_start`` as in :meth:`submit`."""
        if choices < 1:
            raise UsageError("a request needs at least one row")
        ticket = Ticket(self.cancel, put, choices, on_start, work=work)
        # object(): a key no other row has, so a solo row is always taken alone
        return self._queued(ticket, [Row(ticket=ticket, index=index, settings=None, key=object(), canvases=0)
                                     for index in range(choices)])

    def _queued(self, ticket: Ticket, rows: list[Row]) -> Ticket:
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
            ticket.notify_start()
        # Rows taken out of the queue end here; rows already running end at the next boundary.
        for row in waiting:
            self._row_closed(row, served=False)

    def _unqueue(self, ticket: Ticket) -> tuple[list[Row], bool]:
        """Take a ticket's waiting rows out of the queue (hold ``_cond``): the rows removed, and
        whether this left the ticket's queue (none of its rows had started; it counts as started now)."""
        waiting = [row for row in self._queue if row.ticket is ticket]
        if waiting:
            self._queue = deque(row for row in self._queue if row.ticket is not ticket)
            self._counters.rows_queued -= len(waiting)
        if ticket.started:
            return waiting, False
        ticket.started = True
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
        run: RunningBatch | None = None
        while True:
            with self._cond:
                while run is None and not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                with self.lock:  # every device operation of the batcher runs under the model's lock
                    run = self._boundary(run)
                if run is None or self._at_boundary():
                    continue
                self._denoise(run)
            except BaseException as exc:  # noqa: BLE001 - every row of the batch gets it; the scheduler goes on
                rows = (run.rows if run is not None else []) + getattr(self, "_admitting", [])
                self._admitting = []
                for ticket in dict.fromkeys(row.ticket for row in rows):
                    self._fail(ticket, exc)
                run = None
                self._set_in_flight(0)

    def _at_boundary(self) -> bool:
        """Called at each canvas boundary before the next canvas: true skips the canvas for now (the
        boundary runs again: cancelled rows dropped, waiting ones admitted). Never here; tests
        patch it to hold the scheduler, which makes queue states reproducible without timing."""
        return False

    def _set_in_flight(self, rows: int) -> None:
        with self._cond:
            self._counters.rows_in_flight = rows

    def _boundary(self, run: RunningBatch | None) -> RunningBatch | None:
        """Between two canvases: drop, encode, admit (see the module's docstring), or with no batch
        left, run a solo row at the head of the queue. Call it holding ``lock``."""
        if run is not None:
            keep = [row for row in run.rows if not row.ended and not row.ticket.cancelled]
            for row in run.rows:
                if not row.ended and row.ticket.cancelled:  # cancelled while running
                    self._row_closed(row, served=False)
            if keep and run.pending is not None:
                self._encode_pending(run, keep)
            run.rows, run.pending = keep, None
            if not keep:
                run = None
        free = self.max_batch - (len(run.rows) if run is not None else 0)
        taken = self._take(run.key if run is not None else None, free) if free > 0 else []
        if taken and taken[0].ticket.work is not None:  # a solo row (see _take)
            self._run_solo(taken.pop())
        if taken:
            # The newcomers' prompts are encoded on their own first (into transformers' dynamic
            # cache): if that fails (a prompt too long for the memory left, say), only their
            # requests fail and the running batch goes on untouched.
            self._admitting = taken
            try:
                self._admit(run, taken)
            except Exception as exc:  # noqa: BLE001 - reported to the admitting requests alone
                self._admitting = []
                for ticket in dict.fromkeys(row.ticket for row in taken):
                    self._fail(ticket, exc)
            else:
                run = self._join(run, taken)
                self._admitting = []
        self._set_in_flight(len(run.rows) if run is not None else 0)
        return run

    def _take(self, key: object | None, free: int) -> list[Row]:
        """Waiting rows to admit: in arrival order, up to ``free``, stopping at another key (so a
        solo row, whose key is its own, only ever comes alone, when no batch runs)."""
        taken: list[Row] = []
        with self._cond:
            while self._queue and len(taken) < free:
                row = self._queue[0]
                key = row.key if key is None else key
                if row.key != key:
                    break
                taken.append(self._queue.popleft())
            self._counters.rows_queued -= len(taken)
            starting = list(dict.fromkeys(row.ticket for row in taken if not row.ticket.started))
            for ticket in starting:
                ticket.started = True
            self._counters.requests_queued -= len(starting)
        for ticket in starting:
            ticket.notify_start()
        return taken

    def _run_solo(self, row: Row) -> None:
        """Run a solo request's row alone: its work's items go to the consumer, its passes are
        counted, and it stops after the canvas in progress once the request is cancelled."""
        ticket, failure = row.ticket, None
        self._set_in_flight(1)
        try:
            for part in ticket.work(row.index) if not ticket.cancelled else ():
                if isinstance(part, Committed):
                    with self._cond:
                        self._counters.decoder_forwards += part.passes
                        self._counters.row_forwards += part.passes
                    if ticket.cancelled:
                        break
                elif not ticket.cancelled:
                    self._put(ticket, part)
        except BaseException as exc:  # noqa: BLE001 - the request gets it; the scheduler goes on
            failure = exc
        self._set_in_flight(0)  # before the request's end is delivered
        if failure is not None:
            self._fail(ticket, failure)
        else:
            self._row_closed(row, served=not ticket.cancelled)

    def _needed(self, row: Row) -> int:
        """Positions ``row`` will hold at most: its prompt and every canvas it may commit."""
        return len(row.ticket.prompt) + row.canvases * self.canvas_length

    def _runner_for(self, rows: list[Row]) -> CanvasRunner:
        """The runner, with room for ``rows`` (built at the first batch; a larger context bucket
        when a row needs more, its rows' keys and values carried over)."""
        capacity = bucket(max(self._needed(row) for row in rows))
        runner = self.runner
        if runner is not None and capacity <= runner.backend.capacity:
            return runner
        if runner is not None:
            capacity = max(capacity, runner.backend.capacity)
        backend = StaticBackend(self.loaded, self.max_batch, capacity)
        new = CanvasRunner(self.loaded, backend, graphs=self.graphs)
        if runner is not None:
            backend.kv.take_rows(runner.backend.kv)
            new.seeds.copy_(runner.seeds)
        self.runner = new
        return new

    def _admit(self, run: RunningBatch | None, rows: list[Row]) -> None:
        """Prefill ``rows``' prompts into free slots (``run`` is only read)."""
        used = {row.slot for row in run.rows} if run is not None else set()
        free = [slot for slot in range(self.max_batch) if slot not in used]
        runner = self._runner_for(rows + (run.rows if run is not None else []))
        slots = free[:len(rows)]
        if run is None:  # a new batch: nothing of an earlier one stays in the slots
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            for slot in free[len(rows):]:
                runner.backend.clear(slot)
        runner.backend.load([row.ticket.prompt for row in rows], slots, rows[0].settings.pad_token_id)
        runner.set_seeds([row.settings.seed for row in rows], slots)
        for row, slot in zip(rows, slots):
            row.slot = slot
        with self._cond:
            self._counters.encoder_forwards += 1

    def _join(self, run: RunningBatch | None, rows: list[Row]) -> RunningBatch:
        """Make ``rows`` (prefilled by :meth:`_admit`) a batch, or add them to ``run``."""
        now = time.perf_counter()
        for row in rows:
            row.started = now
        if run is None:
            with self._cond:
                self._counters.batches += 1
            return RunningBatch(rows=list(rows), key=rows[0].key, settings=rows[0].settings)
        run.rows.extend(rows)
        return run

    def _encode_pending(self, run: RunningBatch, keep: list[Row]) -> None:
        """Encode the last committed canvas of every slot; slots whose row left are emptied."""
        runner = self.runner
        runner.run_encoder(run.pending)
        kept = {row.slot for row in keep}
        for slot in range(self.max_batch):
            if slot not in kept:
                runner.backend.clear(slot)
        with self._cond:
            self._counters.encoder_forwards += 1

    def _denoise(self, run: RunningBatch) -> None:
        """One canvas of every row of ``run``: steps, commit, deliveries."""
        settings = run.settings
        rows = run.rows
        runner = self.runner
        slots, device = self.max_batch, self.device
        n_steps = settings.max_denoising_steps
        observed = [row for row in rows if row.ticket.observe and not row.ticket.cancelled]
        schedule = TemperatureSchedule(settings.t_min, settings.t_max, n_steps)
        with self.lock:
            eos = torch.tensor(settings.eos_token_ids, device=device)
            active = torch.tensor([row.slot for row in rows], dtype=torch.long, device=device)
            finished = torch.ones(slots, dtype=torch.bool, device=device)  # empty slots draw nothing
            finished[active] = False
            canvas_index = torch.zeros(slots, dtype=torch.long, device=device)
            canvas_index[active] = torch.tensor([row.done_canvases for row in rows], dtype=torch.long, device=device)
            canvas = runner.sampler.initial_canvas(slots, ~finished, canvas_index)
            steps, state = 0, None
            for steps, state in runner.denoise(settings, canvas, finished, canvas_index,
                                               torch.zeros(slots, dtype=torch.int, device=device)):
                if observed:
                    shown = clone_state(state) if runner.graphs else state
                    self._deliver_steps(observed, shown, steps, n_steps, schedule.value(n_steps - steps + 1))
                if steps % FAST_CHECK_EVERY == 0 and all(row.ticket.cancelled for row in rows):
                    break  # nobody wants this canvas any more (host-side flags: no device sync)
            committed, ended_now = commit_canvas(state.draft, finished, eos, settings.pad_token_id)
            tokens, ended, forwards = committed.tolist(), ended_now.tolist(), state.forwards.tolist()
        with self._cond:
            self._counters.canvases += 1
            self._counters.decoder_forwards += steps
            self._counters.row_forwards += sum(forwards[row.slot] for row in rows)
        run.pending = committed
        still = sum(1 for row in rows if not (ended[row.slot] or row.done_canvases + 1 >= row.canvases
                                              or row.ticket.cancelled))
        self._set_in_flight(still)
        for row in rows:
            row.tokens.extend(tokens[row.slot])
            row.steps.append(forwards[row.slot])
            row.forwards += forwards[row.slot]
            row.done_canvases += 1
            if row.ticket.cancelled:
                continue
            if ended[row.slot] or row.done_canvases >= row.canvases:
                row.ended = True
                self._row_done(row)
            else:
                self._put(row.ticket, row.canvas_item(self.loaded.tokenizer))

    def _deliver_steps(self, observed: list[Row], state: StepState, step: int, n_steps: int,
                       temperature: float) -> None:
        for row in observed:
            if not row.ticket.cancelled:
                self._put(row.ticket, row.step_item(state, step, n_steps, temperature))

    def _row_done(self, row: Row) -> None:
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        self._put(row.ticket, row.done_item(self.loaded.tokenizer, peak))
        self._row_closed(row, served=True)

    def _row_closed(self, row: Row, *, served: bool) -> None:
        """One row of a ticket is over; the ticket ends with its last row."""
        ticket = row.ticket
        with self._cond:
            if served:
                self._counters.rows_served += 1
            ticket.open_rows -= 1
            last = ticket.open_rows == 0 and not ticket.ended.is_set()
            if last:
                if ticket.cancelled:
                    self._counters.requests_cancelled += 1
                else:
                    self._counters.requests_served += 1
        if last:
            self._end(ticket)

    def _put(self, ticket: Ticket, item: Item) -> None:
        """Hand ``item`` to the ticket's consumer; a consumer that raises is treated as gone."""
        try:
            ticket.put(item)
        except Exception:  # noqa: BLE001 - the consumer's failure must not stop the batch
            logging.getLogger("diffgen.batcher").exception("diffgen: a request's consumer failed; request cancelled")
            self.cancel(ticket)  # its waiting rows leave the queue too, as on any cancel

    def _end(self, ticket: Ticket) -> None:
        try:
            self._put(ticket, End())
        finally:
            ticket.ended.set()

    def _fail(self, ticket: Ticket, exc: BaseException) -> None:
        with self._cond:
            if ticket.ended.is_set() or ticket.failed:
                return
            ticket.failed = True
            # A request its consumer had cancelled already ends as cancelled, not as failed.
            if ticket.cancelled:
                self._counters.requests_cancelled += 1
            else:
                self._counters.requests_failed += 1
            ticket.cancelled = True  # its other rows stop too
            _, starting = self._unqueue(ticket)
            ticket.open_rows = 0
        if starting:
            ticket.notify_start()
        try:
            self._put(ticket, Failed(exc))
        finally:
            self._end(ticket)
