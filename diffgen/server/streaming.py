"""A request's generation on its way to the client: started (:func:`start_work`), then streamed
as server-sent events (:func:`stream_events`) or collected into choices (:func:`collect`).

Every generation runs on the batcher's scheduler thread (batched, or alone) and hands its typed
items (:mod:`diffgen.denoise.items`) to the event loop through an asyncio queue; a choice's
completion becomes its answer here (:meth:`~diffgen.server.engine.Engine.choice`). When the client
goes away, the generation is cancelled: a request still waiting leaves the queue, a batched row
leaves the batch at the next canvas boundary, a request running alone stops after its canvas in
progress.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from diffgen.denoise import items
from diffgen.errors import DiffgenError
from diffgen.server import answers, wire
from diffgen.server.answers import Choice, Deltas

if TYPE_CHECKING:
    from starlette.requests import Request

    from diffgen.denoise.events import Completion, StepEvent
    from diffgen.images import VisionInputs
    from diffgen.records.trace import CanvasRecord, StepRecord
    from diffgen.server.admission import Reservation
    from diffgen.server.engine import Engine

LOG = logging.getLogger("diffgen.server")


@dataclass
class Work:
    """A generation started for one HTTP request: its items arrive in ``queue``; ``cancel()`` stops
    it; ``choice(completion)`` is a ``Done`` item's answer."""

    queue: asyncio.Queue
    cancel: Callable[[], None]
    choice: Callable[[Completion], Choice]


def start_work(engine: Engine, request: wire.Request, ids: list[int], reservation: Optional[Reservation] = None,
               vision: Optional[VisionInputs] = None) -> Work:
    """Queue ``request`` in the engine's batcher (``vision``: its image inputs); its items are
    handed to this event loop's queue. No thread of the event loop's pool waits for the model:
    the queue, not the pool, bounds the waiting requests (``--max-queue``)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: items.Item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server stopped): nobody is listening
            pass

    ticket = engine.submit(request, ids, put, reservation, vision)
    return Work(queue, ticket.cancel, functools.partial(engine.choice, request, ids))


async def disconnected(request: Request) -> None:
    """Return once the client has gone away (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, work: Work, n: int) -> list[Choice]:
    """The choices of a non-streamed request; cancels the work if the client disconnects first."""
    gone = asyncio.ensure_future(disconnected(request))
    choices: dict[int, Choice] = {}
    failure: Optional[BaseException] = None
    try:
        while True:
            get = asyncio.ensure_future(work.queue.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                work.cancel()
                raise wire.ApiError(499, "the client closed the connection", code="client_closed")
            item = get.result()
            if isinstance(item, items.Done):
                choices[item.index] = work.choice(item.completion)
            elif isinstance(item, items.Failed):
                failure = item.error
            elif isinstance(item, items.End):
                break
    finally:
        gone.cancel()
    if failure is not None:
        raise failure
    return [choices[index] for index in range(n)]


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(engine: Engine, request: wire.Request, ids: list[int],
                        work: Optional[Work] = None) -> AsyncIterator[str]:
    """The server-sent events of one streamed request: a first chunk with the role, one chunk per
    committed canvas that added text (``content``) or thoughts (``reasoning_content``), a chunk
    with each choice's finish reason, the usage when asked, then ``data: [DONE]``. The generation
    (``work``) is started here when not given, and cancelled when the client goes away
    (Starlette cancels this generator)."""
    work = work if work is not None else start_work(engine, request, ids)
    events = Events(engine, request, work.choice)
    try:
        while not isinstance(item := await work.queue.get(), items.End):
            for event in await events.of(item):
                yield event
        for event in events.last():
            yield event
    finally:
        work.cancel()  # nothing once it has ended


class Events:
    """The server-sent events of one streamed request's items (see :func:`stream_events`)."""

    def __init__(self, engine: Engine, request: wire.Request, choice: Callable[[Completion], Choice]):
        self.request, self.name, self.choice = request, engine.name, choice
        self.id, self.created = answers.new_id(request.kind), answers.now()
        self.texts = [Deltas(request.stop) for _ in range(request.n)]
        self.thoughts = [Deltas(()) for _ in range(request.n)]
        self.started = [False] * request.n
        self.finished: list[Choice] = []
        self.steps = StepRecords(engine, request.n) if request.stream_steps else None

    async def of(self, item: items.Item) -> list[str]:
        """The events of one item (none for some)."""
        if isinstance(item, items.Step):
            if self.steps is None:
                return []
            # Off the event loop: reading a step's tensors waits for the device.
            record = await asyncio.to_thread(self.steps.step, item.index, item.event)
            return [self.extension(item.index, "diffgen_step", record.to_stream())]
        if isinstance(item, items.Canvas):
            return self.canvas(item)
        if isinstance(item, items.Done):
            return self.done(item)
        if isinstance(item, items.Failed):
            LOG.error("diffgen: error while streaming", exc_info=item.error)
            message = item.error.message if isinstance(item.error, DiffgenError) else \
                f"the server failed: {type(item.error).__name__}; see the server's log"
            return [sse(wire.error_body(message, type="server_error", code="internal_error"))]
        return []

    def canvas(self, item: items.Canvas) -> list[str]:
        out = []
        if self.steps is not None and (record := self.steps.commit(item.index)) is not None:
            out.append(self.extension(item.index, "diffgen_canvas", record.to_stream()))
        out.append(self.piece(item.index, self.texts[item.index].update(item.text),
                              self.thoughts[item.index].update(item.thoughts or "")))
        return [event for event in out if event]

    def done(self, item: items.Done) -> list[str]:
        index, choice = item.index, self.choice(item.completion)
        self.finished.append(choice)
        out = [self.piece(index, self.texts[index].update(choice.text, final=True),
                          self.thoughts[index].update(choice.thoughts or "", final=True))]
        token_ids = list(choice.token_ids) if self.request.return_token_ids else None
        out.append(sse(answers.chunk(self.request, self.name, id=self.id, created=self.created, index=index,
                                     finish_reason=choice.finish_reason, token_ids=token_ids, stats=choice.stats)))
        return [event for event in out if event]

    def last(self) -> list[str]:
        """The usage chunk when asked, then ``[DONE]``."""
        out = []
        if self.request.include_usage and self.finished:
            out.append(sse(answers.usage_chunk(self.request, self.name, self.finished, id=self.id,
                                               created=self.created)))
        return out + ["data: [DONE]\n\n"]

    def extension(self, index: int, field: str, payload: dict[str, Any]) -> str:
        role = self.request.kind == "chat" and not self.started[index]
        self.started[index] = True
        return sse(answers.extension_chunk(self.request, self.name, id=self.id, created=self.created, index=index,
                                           name=field, payload=payload, role=role))

    def piece(self, index: int, content: str, reasoning: str) -> Optional[str]:
        role = self.request.kind == "chat" and not self.started[index]
        if not (content or reasoning or role):
            return None
        self.started[index] = True
        return sse(answers.chunk(self.request, self.name, id=self.id, created=self.created, index=index,
                                 content=content or None, reasoning=reasoning or None, role=role))


class StepRecords:
    """Host records of a streamed request's steps (``stream_steps``), one choice at a time.

    Each step event becomes the :class:`~diffgen.records.trace.StepRecord` a local run's view and
    trace would get (token texts decoded here, with the model's tokenizer, so that a client needs
    none). The committed canvas, which the canvas item carries only as text, is the canvas's last
    draft with pad after its first EOS: what the loop commits for a row.
    """

    def __init__(self, engine: Engine, choices: int):
        from diffgen.records import trace

        self.texts = trace.TokenTexts(engine.loaded.tokenizer)
        self.eos = set(engine.settings.eos_token_ids)
        self.pad = engine.settings.pad_token_id
        self.last: list[Optional[StepRecord]] = [None] * choices
        self.count = [0] * choices

    def step(self, index: int, event: StepEvent) -> StepRecord:
        from diffgen.records import trace

        record = next(trace.records([event], self.texts))
        if self.last[index] is not None and self.last[index].canvas != record.canvas:
            self.count[index] = 0
        self.last[index] = record
        self.count[index] += 1
        return record

    def commit(self, index: int) -> Optional[CanvasRecord]:
        """The :class:`~diffgen.records.trace.CanvasRecord` of the canvas just committed (``None``
        when no step of it was seen)."""
        from diffgen.records.trace import CanvasRecord

        last = self.last[index]
        if last is None:
            return None
        tokens = list(last.draft)
        end = next((at for at, token in enumerate(tokens) if token in self.eos), None)
        if end is not None:
            tokens[end + 1:] = [self.pad] * (len(tokens) - end - 1)
        record = CanvasRecord(canvas=last.canvas, canvases=last.canvases, tokens=tokens,
                              texts=self.texts.texts(tokens), steps=self.count[index], finished=end is not None,
                              elapsed=last.elapsed, fixed=last.fixed)
        self.last[index], self.count[index] = None, 0
        return record
