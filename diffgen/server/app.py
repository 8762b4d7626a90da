"""The OpenAI-compatible HTTP API over one resident model: ``create_app(engine)``.

Why FastAPI on uvicorn rather than a hand-written server: the OpenAI API is plain JSON over
HTTP/1.1 plus server-sent events, and Starlette (under FastAPI) already does the parts that are
easy to get subtly wrong — HTTP parsing and keep-alive (uvicorn with h11), streaming responses
that stop when the server shuts down, graceful shutdown on SIGTERM (uvicorn drains in-flight
requests), a thread pool for blocking work, and an OpenAPI schema for free. Both are the stack
that vLLM's and SGLang's OpenAI servers use, so clients' expectations are met by the same code.
The bodies themselves are checked by :mod:`diffgen.server.wire` (not pydantic models) so that the
sampler's fields get the very checks and messages of the CLI.

Concurrency: requests under the fast sampler (``serve``'s default) go to a continuous batcher
(:mod:`diffgen.denoise.batcher`): requests that arrive together are denoised as rows of one
batch, a request arriving while a batch runs joins it at the next canvas boundary (up to
``--max-batch`` rows), and a row whose client disconnects is dropped at the next boundary.
Requests the batcher cannot take (the exact sampler, ``response_format`` json_schema) run one
at a time through the serial path (:meth:`Engine.serial_streaming`, streamed or not), each on a
thread of its own (not the event loop's pool, whose 40 threads waiting requests would use up). One
first-come-first-served lock guards the model: the serial path holds it for a whole request, the
batcher for one canvas at a time. A request takes its place in the queue (:meth:`Engine.admit`)
before anything of it runs in a thread: its prompt and images are read only once admitted.
Requests waiting to start (for a slot in the batch or for the lock) form the queue; when
``--max-queue`` of them wait, a new one gets 429 with ``Retry-After``. A request's ``steps`` and
images are bounded (``--max-steps``, ``--max-images``: 422 beyond). ``GET /metrics`` shows
the counts in Prometheus' text format (:mod:`diffgen.server.metrics`).

Errors: every refusal is an OpenAI-style error object with its status (400 malformed JSON or a
prompt over the context, 401 a missing or wrong key, 404 unknown model or route, 413 a body over
the limit, 422 bad parameters, 429 a full queue); an unexpected exception in a request becomes a 500 error object
(its traceback goes to the server's log, never to the client) and the server goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffgen.errors import DiffgenError, PromptTooLongError
from diffgen.server import wire

DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes: a full 8k-token context is well under 100 kB of JSON
DEFAULT_MAX_BATCH = 8  # rows denoised together: each costs ~1.3 GiB of logits-sized memory on the real model
DEFAULT_MAX_QUEUE = 64  # requests waiting to start before new ones get 429
# Images one request may carry: each takes up to ~280 soft tokens of the prompt, so the released
# model's context holds a few dozen at most, and each is decoded in memory (up to 40 MP, ~120 MB).
DEFAULT_MAX_IMAGES = 8
LOG = logging.getLogger("diffgen.server")


class FairLock:
    """A lock handed out in the order it was asked for (``threading.Lock`` is not fair: a batcher
    that releases and re-takes it between canvases could starve a waiting exact request)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0
        self._held = False

    def acquire(self) -> bool:
        with self._cond:
            turn = self._next
            self._next += 1
            while turn != self._serving:
                self._cond.wait()
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._serving += 1
            self._cond.notify_all()

    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Reservation:
    """A request's place in the queue, given back once (:meth:`release`) when its generation starts."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._released = False

    def release(self) -> None:
        with self._engine._admission:
            if not self._released:
                self._released = True
                self._engine.counts["queued"] -= 1


@dataclass
class Engine:
    """The resident model and how it generates.

    Attributes:
        loaded: the :class:`~diffgen.loading.loader.LoadedModel`.
        name: the model id clients send and ``/v1/models`` lists.
        settings: the checkpoint's :class:`~diffgen.settings.GenerationSettings`; a request's
            fields replace some of them.
        exact: the loop's ``exact`` argument (``None``: the device's default sampler). Requests
            under the fast sampler are batched; under the exact one they run one at a time.
        lock: guards the model: held for a whole serial request, or for one canvas of a batch.
        vocab: the :class:`~diffgen.denoise.schema.Vocabulary` that ``response_format``
            json_schema requests restrict their value slots to, built at the first such request
            (it reads every token's text once) and kept (``None`` until then).
        max_batch: rows denoised together at most (1: one row at a time, through the batcher).
        max_queue: requests that may wait to start; one more gets 429.
        batcher: the :class:`~diffgen.denoise.batcher.Batcher`, made at the first batched request.
        counts: the serial path's and the queue's counters (``queued`` requests waiting to
            start, ``rejected`` 429s, ``serial_served``/``serial_failed`` requests,
            ``serial_running`` rows, ``serial_forwards`` decoder passes).
        allow_local_images: ``image_url`` parts may name local files (``serve --allow-local-images``).
        allow_remote_images: ``image_url`` parts may be http(s) URLs, fetched by the server
            (``serve --allow-remote-images``).
        processor: transformers' processor for image requests, built at the first one (``None``
            until then).
        max_steps: the largest ``steps`` a request may ask for (``serve --max-steps``); more is a 422.
        max_images: images one request may carry at most (``serve --max-images``); more is a 422.
    """

    loaded: Any
    name: str
    settings: Any
    exact: Optional[bool] = None
    lock: FairLock = field(default_factory=FairLock)
    vocab: Any = field(default=None, repr=False)
    allow_local_images: bool = False
    allow_remote_images: bool = False
    processor: Any = field(default=None, repr=False)
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    max_steps: int = wire.DEFAULT_MAX_STEPS
    max_images: int = DEFAULT_MAX_IMAGES
    batcher: Any = field(default=None, repr=False)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("queued", "rejected", "serial_served", "serial_failed", "serial_running", "serial_forwards"), 0))
    _admission: Any = field(default_factory=threading.Lock, repr=False)
    _building: Any = field(default_factory=threading.Lock, repr=False)  # vocab and processor, built once
    _mean_seconds: float = field(default=1.0, repr=False)

    # -- where a request goes ----------------------------------------------------------------

    @property
    def fast(self) -> bool:
        """Whether generations use the fast sampler (``exact=None``: the loop's device default)."""
        if self.exact is None:
            return self.loaded.model.device.type != "cpu"
        return not self.exact

    def batches(self, request: wire.Request) -> bool:
        """Whether ``request`` goes to the batcher (else the serial path). The batcher runs
        diffgen's fused passes, which need the whole model on one device (not offloaded)."""
        from diffgen.denoise.fused import fusable

        return self.fast and request.schema is None and not request.images and fusable(self.loaded.model)

    def screen(self, request: wire.Request) -> None:
        """The checks that need neither the model nor a worker thread, made on the event loop before
        the request takes a place in the queue: the server's bounds on ``steps`` (and ``stability``)
        and on images, and
        whether the model takes images at all (a vision tower and an image processor's config:
        before any image is read or decoded)."""
        # stability too: the sampler keeps that many steps of history per row (a huge value once
        # allocated gigabytes), and a canvas never runs more than max_steps steps anyway.
        for key, name in (("steps", "max_denoising_steps"), ("stability", "stability_threshold")):
            value = request.flags.get(name)
            if value is not None and value > self.max_steps:
                raise wire.invalid(key, f"must be at most {self.max_steps} on this server (got {value}; "
                                        "serve --max-steps sets the bound)")
        if not request.images:
            return
        from diffgen import images

        if self.processor is None:  # built: it takes images
            try:
                images.check_takes_images(self.loaded.checkpoint.path, self.loaded.model.config.to_dict())
            except DiffgenError as exc:
                raise wire.ApiError(422, f"the model {self.name!r} takes no images: {exc.message}",
                                    param="messages", code="images_unsupported") from exc
        if len(request.images) > self.max_images:
            raise wire.ApiError(422, f"at most {self.max_images} images per request on this server (got "
                                     f"{len(request.images)}; serve --max-images sets the bound)",
                                param="messages", code="too_many_images")

    def admit(self) -> Reservation:
        """A place in the queue, or a 429 :class:`~wire.ApiError` when ``max_queue`` requests wait."""
        with self._admission:
            queued = self.counts["queued"]
            if queued >= self.max_queue:
                self.counts["rejected"] += 1
                raise wire.queue_full(queued, max(1, math.ceil(self._mean_seconds)))
            self.counts["queued"] += 1
        return Reservation(self)

    def _finished(self, seconds: float) -> None:
        """Keep a running mean of request time (for ``Retry-After``)."""
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds

    def _get_batcher(self) -> Any:
        from diffgen.denoise.batcher import Batcher

        with self._admission:
            if self.batcher is None:
                self.batcher = Batcher(self.loaded, max_batch=self.max_batch, lock=self.lock)
            return self.batcher

    def submit(self, request: wire.Request, ids: list[int], put: Callable[[tuple], None],
               reservation: Optional[Reservation] = None) -> Any:
        """Hand a batchable request to the batcher; returns its :class:`~diffgen.denoise.batcher.Ticket`
        (``cancel()`` it when the client goes away). ``put`` receives the items of
        :meth:`serial_streaming`, from the batcher's thread."""
        batcher = self._get_batcher()
        settings = [self.settings_for(request, index) for index in range(request.n)]
        started = time.perf_counter()

        def relay(item: tuple) -> None:
            if item[0] == "done":
                item = ("done", item[1], self.choice(request, ids, item[2]))
            elif item[0] == "end":
                self._finished(time.perf_counter() - started)
            put(item)

        return batcher.submit(ids, settings, relay, observe=bool(getattr(request, "stream_steps", False)),
                              on_start=reservation.release if reservation is not None else None)

    @contextmanager
    def _serial(self, reservation: Optional[Reservation]) -> Iterator[None]:
        """The serial path's turn: the model lock, the reservation given back, the counts kept."""
        started = time.perf_counter()
        try:
            with self.lock:
                if reservation is not None:
                    reservation.release()
                self.counts["serial_running"] += 1
                try:
                    yield
                except BaseException:
                    self.counts["serial_failed"] += 1
                    raise
                else:
                    self.counts["serial_served"] += 1
                finally:
                    self.counts["serial_running"] -= 1
        finally:
            if reservation is not None:
                reservation.release()
            self._finished(time.perf_counter() - started)

    def prompt_ids(self, request: wire.Request) -> list[int]:
        """The request's token ids (chat template for chat, the text as is for completions)."""
        from diffgen import prompt as prompt_mod

        tokenizer = self.loaded.tokenizer
        if request.kind == "chat":
            return prompt_mod.encode_messages(tokenizer, request.messages, think=request.think)
        return prompt_mod.encode(tokenizer, request.prompt, raw=True)

    def settings_for(self, request: wire.Request, index: int) -> Any:
        return self.settings.replace(**request.flags, seed=request.choice_seed(index))

    def check(self, request: wire.Request) -> tuple[list[int], Any]:
        """Token ids and the first choice's settings; refusals as :class:`~wire.ApiError`."""
        from diffgen.denoise.loop import check_context

        try:
            settings = self.settings_for(request, 0)
        except DiffgenError as exc:  # e.g. t_min above the checkpoint's t_max
            param = next((key for key in ("t_min", "t_max") if key in request.flags), None)
            raise wire.invalid(None, exc.message, param=param) from exc
        try:
            ids = self.prompt_ids(request)
        except DiffgenError as exc:
            raise wire.ApiError(400, exc.message, code="invalid_prompt") from exc
        if not ids:
            raise wire.invalid("prompt", "the prompt has no tokens")
        if request.schema is not None:
            settings = settings.replace(max_new_tokens=len(self.schema_layout(request.schema).tokens))
        try:
            check_context(self.loaded.model, len(ids), settings)
        except PromptTooLongError as exc:
            raise wire.ApiError(400, f"{exc.message}; shorten the prompt or lower max_tokens",
                                param="messages" if request.kind == "chat" else "prompt",
                                code="context_length_exceeded") from exc
        return ids, settings

    def vocabulary(self) -> Any:
        from diffgen.denoise import schema as schema_mod

        if self.vocab is not None:  # built: no lock (the model's would wait for a whole generation)
            return self.vocab
        with self._building:  # built once, even when two schema requests arrive together
            if self.vocab is None:
                vocab_size = int(self.loaded.model.config.get_text_config().vocab_size)
                self.vocab = schema_mod.vocabulary(self.loaded.tokenizer, vocab_size, self.settings.pad_token_id)
            return self.vocab

    def schema_layout(self, schema: dict) -> Any:
        """The schema laid out on canvases (its length fixes the answer's); a 422 where it cannot be."""
        from diffgen.denoise import schema as schema_mod

        try:
            return schema_mod.layout(schema, self.loaded.tokenizer, self.vocabulary(),
                                     int(self.loaded.model.config.canvas_length))
        except DiffgenError as exc:
            raise wire.ApiError(422, exc.message, param="response_format", code="unsupported_schema") from exc

    def schema_choice(self, request: wire.Request, ids: list[int], index: int) -> wire.Choice:
        """One choice of a json_schema request: the JSON text as ``run --schema`` generates it (call
        it under the lock). ``token_ids`` are the laid-out positions, pad dropped."""
        from diffgen.denoise.schema import generate_json

        result = generate_json(self.loaded, ids, request.schema, self.settings_for(request, index), exact=self.exact,
                               vocab=self.vocab)
        pad = self.settings.pad_token_id
        tokens = tuple(token for token in result.token_ids[: result.layout.length] if token != pad)
        return wire.Choice(text=result.text, thoughts=None, finish_reason="stop", token_ids=tokens,
                           prompt_tokens=len(ids), completion_tokens=len(tokens))

    def choice(self, request: wire.Request, ids: list[int], completion: Any) -> wire.Choice:
        text, stopped = wire.cut_at_stop(completion.text, request.stop)
        return wire.Choice(text=text, thoughts=completion.thoughts,
                           finish_reason=wire.finish_reason(completion.finish_reason, stopped),
                           token_ids=tuple(completion.token_ids), prompt_tokens=len(ids),
                           completion_tokens=len(completion.token_ids),
                           stats=dataclasses.asdict(completion.stats) if completion.stats is not None else None)

    def serial_streaming(self, request: wire.Request, ids: list[int], put: Any,
                         reservation: Optional[Reservation] = None, cancelled: Optional[threading.Event] = None,
                         vision: Any = None, canvases: bool = True) -> None:
        """Generate every choice one after the other under the lock (the serial path: ``--exact``,
        json_schema and image requests), calling ``put(item)`` after each committed canvas with
        ``("canvas", index, text, thoughts)`` and at each choice's end with ``("done", index,
        Choice)``; then ``("end",)``, or ``("error", exc)`` first if one is raised. Stops
        after the canvas in progress once ``cancelled`` is set (the client went away), or as soon
        as it gets the lock when that happened while it waited. ``vision``: the prompt's image
        inputs (:meth:`check_images`); ``canvases``: send the ``canvas`` items (text so far)."""
        from diffgen.denoise.channels import split_response
        from diffgen.denoise.loop import CanvasEvent, StepEvent, stream

        try:
            if request.schema is not None:  # the JSON is sent whole, as one delta, once it is generated
                self.vocabulary()
                with self._serial(reservation):
                    for index in range(request.n):
                        if cancelled is not None and cancelled.is_set():
                            return
                        put(("done", index, self.schema_choice(request, ids, index)))
                return
            with self._serial(reservation):
                for index in range(request.n):
                    if cancelled is not None and cancelled.is_set():  # gone while it waited for the lock
                        return
                    settings = self.settings_for(request, index)
                    generation = stream(self.loaded, [ids], settings, observe=request.stream_steps,
                                        exact=self.exact, vision=[vision] if vision is not None else None)
                    eos = set(settings.eos_token_ids)
                    tokens: list[int] = []
                    for event in generation:
                        if isinstance(event, StepEvent):
                            put(("step", index, event))
                        if not isinstance(event, CanvasEvent):
                            continue
                        self.counts["serial_forwards"] += event.steps
                        if cancelled is not None and cancelled.is_set():
                            return
                        if not canvases:
                            continue
                        tokens.extend(event.tokens[0].tolist())
                        end = next((i for i, token in enumerate(tokens) if token in eos), len(tokens))
                        response = split_response(self.loaded.tokenizer, tokens[: min(end, settings.max_new_tokens)])
                        put(("canvas", index, response.text, response.thoughts))
                    put(("done", index, self.choice(request, ids, generation.result.completions[0])))
        except BaseException as exc:  # noqa: BLE001 - handed to the response, which reports it
            put(("error", exc))
        finally:
            put(("end",))


    # -- images (``image_url`` parts): their own methods, on the one-at-a-time path ----------------

    def check_images(self, request: wire.Request) -> tuple[list[int], Any]:
        """Token ids and image inputs of a chat request with images, the context checked: every
        image read and checked, then the conversation through transformers' processor. Refusals
        as :class:`~wire.ApiError` (blocking: run it in a worker thread)."""
        from diffgen import images
        from diffgen.denoise.loop import check_context

        try:
            settings = self.settings_for(request, 0)
        except DiffgenError as exc:
            param = next((key for key in ("t_min", "t_max") if key in request.flags), None)
            raise wire.invalid(None, exc.message, param=param) from exc
        read = [self.request_image(url, where) for url, where in request.images]
        pictures = iter(read)
        turns = [turn if isinstance(turn["content"], str) else
                 {**turn, "content": [{"type": "image", "image": next(pictures).image} if part["type"] == "image"
                                      else part for part in turn["content"]]}
                 for turn in request.messages]
        try:
            ids, vision = images.encode_turns(self.image_processor(), turns, think=request.think)
            images.check_positions(vision, self.loaded.model.config.to_dict(), read)
            check_context(self.loaded.model, len(ids), settings)
        except PromptTooLongError as exc:
            raise wire.ApiError(400, f"{exc.message}; send fewer images, shorten the prompt or lower max_tokens",
                                param="messages", code="context_length_exceeded") from exc
        except DiffgenError as exc:
            raise wire.ApiError(400, exc.message, code="invalid_prompt") from exc
        return ids, vision

    def image_processor(self) -> Any:
        """transformers' processor for this checkpoint, built once; a 422 when the model takes no images."""
        from diffgen import images
        from diffgen.errors import MissingExtraError

        if self.processor is not None:  # built: no lock (the model's would wait for a whole generation)
            return self.processor
        with self._building:
            if self.processor is None:
                try:
                    self.processor = images.load_processor(self.loaded.checkpoint.path, self.loaded.tokenizer,
                                                           self.loaded.model.config.to_dict())
                except MissingExtraError as exc:
                    raise wire.ApiError(501, f"{exc.message}: this server cannot take images ({exc.hint})",
                                        type="server_error", code="images_unavailable") from exc
                except DiffgenError as exc:
                    raise wire.ApiError(422, f"the model {self.name!r} takes no images: {exc.message}",
                                        param="messages", code="images_unsupported") from exc
            return self.processor

    def request_image(self, url: str, where: str) -> Any:
        """One ``image_url`` read and checked (a :class:`~diffgen.images.Picture`); a 422 naming the
        part when it may not be read here, cannot be read or is not a usable image."""
        from diffgen import images
        from diffgen.errors import MissingExtraError

        data = self.image_bytes(url, where)
        try:
            return images.read_image(data, where)
        except MissingExtraError as exc:
            raise wire.ApiError(501, f"{exc.message}: this server cannot take images ({exc.hint})",
                                type="server_error", code="images_unavailable") from exc
        except DiffgenError as exc:
            raise wire.ApiError(422, exc.message if not exc.hint else f"{exc.message} ({exc.hint})", param=where,
                                code="invalid_image") from exc

    def image_bytes(self, url: str, where: str) -> bytes:
        """The bytes behind an ``image_url``: a data URL decoded, a local file read (with
        ``allow_local_images``) or an http(s) URL fetched (with ``allow_remote_images``)."""
        import base64
        import binascii
        import urllib.parse

        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64"):
                raise wire.invalid(where, "a data URL must be base64 (data:image/png;base64,...)")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise wire.invalid(where, f"the data URL's base64 does not decode: {exc}") from exc
        if url.startswith(("file://", "/")):
            if not self.allow_local_images:
                raise wire.ApiError(422, f"{where}: this server does not read local files; send the image as a data "
                                         "URL, or start the server with --allow-local-images", param=where,
                                    code="local_images_disabled")
            path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
            try:
                # Only a regular file: opening a FIFO (or /dev/stdin, a terminal) would wait for a
                # writer forever, and a directory or device is no image.
                if not stat.S_ISREG(os.stat(path).st_mode):
                    raise wire.invalid(where, f"{path} is not a regular file")
                with open(path, "rb") as handle:
                    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # replaced since the stat
                        raise wire.invalid(where, f"{path} is not a regular file")
                    data = handle.read(MAX_IMAGE_BYTES + 1)
            except OSError as exc:
                raise wire.invalid(where, f"cannot read {path}: {exc.strerror or exc}") from exc
            if len(data) > MAX_IMAGE_BYTES:
                raise wire.invalid(where, f"{path} is over {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
            return data
        if not self.allow_remote_images:
            raise wire.ApiError(422, f"{where}: this server does not fetch remote images; send the image as a data "
                                     "URL, or start the server with --allow-remote-images", param=where,
                                code="remote_images_disabled")
        return fetch_image(url, where)

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # one image's file, read or fetched, at most
FETCH_TIMEOUT = 15.0  # seconds a remote image may take to connect, or between two reads
FETCH_DEADLINE = 30.0  # seconds a remote image may take in all (a server trickling bytes meets this one)
FETCH_CHUNK = 64 * 1024  # bytes per read of a remote image (the deadline is checked between reads)


def fetch_image(url: str, where: str, *, deadline: float = FETCH_DEADLINE,
                clock: Callable[[], float] = time.monotonic) -> bytes:
    """GET an http(s) image URL (``serve --allow-remote-images``): at most :data:`MAX_IMAGE_BYTES`,
    redirects followed by urllib, any failure a 422 naming the part. Each connect or read may take
    :data:`FETCH_TIMEOUT` seconds, and the whole fetch ``deadline`` seconds (by ``clock``), checked
    between reads of :data:`FETCH_CHUNK` bytes: urllib's timeout is per socket operation, so a
    server sending a byte every few seconds would otherwise hold the request for hours."""
    import urllib.error
    import urllib.request

    end = clock() + deadline
    data = bytearray()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "diffgen"}),
                                    timeout=FETCH_TIMEOUT) as response:
            while len(data) <= MAX_IMAGE_BYTES:
                if clock() > end:
                    raise wire.invalid(where, f"fetching {url} took over {deadline:g} seconds")
                part = response.read(min(FETCH_CHUNK, MAX_IMAGE_BYTES + 1 - len(data)))
                if not part:
                    break
                data += part
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise wire.invalid(where, f"cannot fetch {url}: {getattr(exc, 'reason', None) or exc}") from exc
    if len(data) > MAX_IMAGE_BYTES:
        raise wire.invalid(where, f"the image at {url} is over {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    return bytes(data)


@dataclass
class Work:
    """A generation started for one HTTP request: its items arrive in ``queue``; ``cancel()`` stops it."""

    queue: asyncio.Queue
    cancel: Callable[[], None]


def start_work(engine: Engine, request: wire.Request, ids: list[int], reservation: Optional[Reservation] = None,
               vision: Any = None) -> Work:
    """Start generating ``request`` (on the batcher's thread, or on a thread of its own for the
    serial path, which takes image inputs: ``vision``); its items are handed to this event loop's
    queue. Why a thread of its own rather than the event loop's pool (``run_in_threadpool``): a
    serial request waits for the model's lock for as long as the requests before it run, and
    anyio's pool has 40 threads, so 40 waiting requests would leave none for anything else (the
    queue, not the pool, bounds the waiting requests: ``--max-queue``)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server stopped): nobody is listening
            pass

    if engine.batches(request):
        ticket = engine.submit(request, ids, put, reservation)
        return Work(queue, ticket.cancel)
    cancelled = threading.Event()
    worker = threading.Thread(target=engine.serial_streaming, args=(request, ids, put),
                              kwargs={"reservation": reservation, "cancelled": cancelled, "vision": vision,
                                      "canvases": request.stream},
                              name="diffgen-generation", daemon=True)
    worker.start()
    return Work(queue, cancelled.set)


async def disconnected(request: Request) -> None:
    """Return once the client has gone away (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, work: Work, n: int) -> list[wire.Choice]:
    """The choices of a non-streamed request; cancels the work if the client disconnects first."""
    gone = asyncio.ensure_future(disconnected(request))
    choices: dict[int, wire.Choice] = {}
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
            if item[0] == "done":
                choices[item[1]] = item[2]
            elif item[0] == "error":
                failure = item[1]
            elif item[0] == "end":
                break
    finally:
        gone.cancel()
    if failure is not None:
        raise failure
    return [choices[index] for index in range(n)]


class ContainFailures:
    """ASGI middleware: an exception that escapes a route becomes a 500 error object, logged with its
    traceback, and the connection stays usable. (Starlette's own last-resort handler re-raises it
    after answering, and uvicorn then closes the keep-alive connection under the client.) Once a
    response has started (a stream), there is nothing else to send: the exception goes on."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: dict) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            logging.getLogger("diffgen.server").error("%s %s failed", scope.get("method"), scope.get("path"),
                                                      exc_info=exc)
            response = JSONResponse(wire.error_body(f"the server failed: {type(exc).__name__}; see the server's log",
                                                    type="server_error", code="internal_error"), status_code=500)
            await response(scope, receive, send)


def create_app(engine: Engine, *, api_key: Optional[str] = None, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The ASGI app serving ``engine``. ``api_key``: required as ``Authorization: Bearer KEY`` on
    every ``/v1`` route (``None``: no key); ``max_body``: the largest request body in bytes."""
    from diffgen import __version__

    app = FastAPI(title="diffgen", version=__version__, openapi_url="/openapi.json", docs_url=None, redoc_url=None)
    app.add_middleware(ContainFailures)
    key = api_key.encode() if api_key else None

    def fail(error: wire.ApiError) -> JSONResponse:
        headers = dict(error.headers or {})
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(error.body(), status_code=error.status, headers=headers or None)

    @app.exception_handler(wire.ApiError)
    async def _api_error(request: Request, exc: wire.ApiError) -> JSONResponse:
        return fail(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return fail(wire.ApiError(exc.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return fail(wire.ApiError(422, str(exc), code="invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this response is sent, and uvicorn logs its traceback: not logged here too.
        return JSONResponse(wire.error_body(f"the server failed: {type(exc).__name__}; see the server's log",
                                            type="server_error", code="internal_error"), status_code=500)

    def authorise(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise wire.ApiError(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                                type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise too_large()
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body:
                raise too_large()
        return wire.parse_body(bytes(data))

    def too_large() -> wire.ApiError:
        return wire.ApiError(413, f"the request body is over the limit of {max_body} bytes "
                                  "(serve --max-body-size raises it)", code="body_too_large")

    def check_model(request: wire.Request) -> None:
        if request.model is not None and request.model != engine.name:
            raise wire.ApiError(404, f"the model {request.model!r} is not served here; this server serves "
                                     f"{engine.name!r} (GET /v1/models)", param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text format: requests, rows in flight, queue depth, batches, decoder passes, 429s."""
        from diffgen.server.metrics import CONTENT_TYPE, render

        authorise(request)
        return PlainTextResponse(render(engine), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorise(request)
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        authorise(request)
        if model_id != engine.name:
            raise wire.ApiError(404, f"the model {model_id!r} is not served here", param="model",
                                code="model_not_found")
        return model_card(engine)

    async def answer(request: Request, parse: Any) -> Any:
        authorise(request)
        parsed = parse(await read_json(request))
        check_model(parsed)
        engine.screen(parsed)  # the server's bounds, and no images for a text-only model, before the queue
        # A place in the queue (a 429 when it is full) before anything runs in the thread pool: a
        # request that waited for the pool would be in no queue, and nothing would bound the wait.
        reservation = engine.admit()
        try:
            vision = None
            if parsed.images:  # images read and decoded only now, admitted; such requests take the serial path
                ids, vision = await run_in_threadpool(engine.check_images, parsed)
            else:  # a schema's first layout reads the vocabulary
                ids, _ = await run_in_threadpool(engine.check, parsed)
        except BaseException:  # refused (or the client left): its place goes back
            reservation.release()
            raise
        work = start_work(engine, parsed, ids, reservation, vision)
        if parsed.stream:
            return StreamingResponse(stream_events(engine, parsed, ids, work), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await collect(request, work, parsed.n)
        return wire.response(parsed, engine.name, choices, id=wire.new_id(parsed.kind), created=wire.now())

    @app.post("/v1/chat/completions", responses=ANSWERS)
    async def chat_completions(request: Request) -> Any:
        return await answer(request, wire.parse_chat)

    @app.post("/v1/completions", responses=ANSWERS)
    async def completions(request: Request) -> Any:
        return await answer(request, wire.parse_text)

    generated = app.openapi

    def openapi() -> dict[str, Any]:
        # The bodies are added to the generated document rather than passed as openapi_extra, which
        # FastAPI encodes as JSON numbers of its own (2**63 - 1, the seed's maximum, became a float).
        if app.openapi_schema is None:
            document = generated()
            for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "text")):
                document["paths"][path]["post"].update(request_body(kind, engine.max_steps))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    return app


def request_body(kind: str, max_steps: int = wire.DEFAULT_MAX_STEPS) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of an endpoint whose handler reads the raw body (the checks are
    :mod:`~diffgen.server.wire`'s, so FastAPI cannot infer it): the schema from wire's field tables,
    so the document cannot drift from them (``max_steps``: the server's bound on ``steps``)."""
    schema = wire.body_schema(kind, max_steps=max_steps)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


ERROR_OBJECT = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "The answer (a JSON object), or with stream: true server-sent events.",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **{status: {"description": what, "content": {"application/json": {"schema": ERROR_OBJECT}}}
       for status, what in ((400, "Malformed JSON or a prompt over the context."),
                            (401, "A missing or wrong API key."), (404, "An unknown model."),
                            (413, "A body over the size limit."), (422, "A bad parameter."),
                            (429, "The queue is full; retry after Retry-After seconds."),
                            (500, "The generation failed (see the server's log)."))},
}


def model_card(engine: Engine) -> dict[str, Any]:
    """The model's ``/v1/models`` entry. Beside OpenAI's fields: ``max_model_len`` (vLLM's name),
    ``canvas_length``, and for diffgen's own clients ``diffgen_settings`` (the checkpoint's
    generation settings, which a request's fields replace) and ``diffgen_channel_ids`` (the thought
    channel's open/close token ids, or null), which ``run --server`` needs to print what a local
    run prints."""
    from diffgen.records.trace import TokenTexts

    model = engine.loaded.model
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    channel_ids = TokenTexts(engine.loaded.tokenizer).channel_ids
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "diffgen",
            "max_model_len": context, "canvas_length": int(model.config.canvas_length),
            "diffgen_settings": engine.settings.to_dict(),
            "diffgen_ignored_fields": sorted(wire.IGNORED_FIELDS),
            "diffgen_channel_ids": list(channel_ids) if channel_ids else None}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(engine: Engine, request: wire.Request, ids: list[int],
                        work: Optional[Work] = None) -> AsyncIterator[str]:
    """The server-sent events of one streamed request: a first chunk with the role, one chunk per
    committed canvas that added text (``content``) or thoughts (``reasoning_content``), a chunk
    with each choice's finish reason, the usage when asked, then ``data: [DONE]``.

    The generation (``work``, started here when not given) runs on the batcher's thread or a
    worker thread and hands its items over through an asyncio queue. When the client goes away
    (Starlette cancels this generator), the generation is cancelled: its row leaves the batch at
    the next canvas boundary."""
    work = work if work is not None else start_work(engine, request, ids)
    try:
        async for event in _events(engine, request, work.queue):
            yield event
    finally:
        work.cancel()  # nothing once it has ended


async def _events(engine: Engine, request: wire.Request, queue: asyncio.Queue) -> AsyncIterator[str]:
    id_, created, name = wire.new_id(request.kind), wire.now(), engine.name
    texts = [wire.Deltas(request.stop) for _ in range(request.n)]
    thoughts = [wire.Deltas(()) for _ in range(request.n)]
    started = [False] * request.n
    finished: list[wire.Choice] = []

    steps = StepRecords(engine, request.n) if request.stream_steps else None

    def extension(index: int, field: str, payload: dict[str, Any]) -> str:
        role = request.kind == "chat" and not started[index]
        started[index] = True
        return sse(wire.extension_chunk(request, name, id=id_, created=created, index=index, name=field,
                                        payload=payload, role=role))

    def piece(index: int, content: str, reasoning: str, **extra: Any) -> Optional[str]:
        role = request.kind == "chat" and not started[index]
        if not (content or reasoning or role or extra):
            return None
        started[index] = True
        return sse(wire.chunk(request, name, id=id_, created=created, index=index, content=content or None,
                              reasoning=reasoning or None, role=role, **extra))

    while True:
        item = await queue.get()
        if item[0] == "step":
            _, index, event = item
            if steps is not None:
                # Off the event loop: reading a step's tensors waits for the device.
                record = await asyncio.to_thread(steps.step, index, event)
                yield extension(index, "diffgen_step", wire.step_payload(record))
        elif item[0] == "canvas":
            _, index, text, thought = item
            if steps is not None and (record := steps.commit(index)) is not None:
                yield extension(index, "diffgen_canvas", wire.canvas_payload(record))
            out = piece(index, texts[index].update(text), thoughts[index].update(thought or ""))
            if out:
                yield out
        elif item[0] == "done":
            _, index, choice = item
            finished.append(choice)
            out = piece(index, texts[index].update(choice.text, final=True),
                        thoughts[index].update(choice.thoughts or "", final=True))
            if out:
                yield out
            yield sse(wire.chunk(request, name, id=id_, created=created, index=index,
                                 finish_reason=choice.finish_reason,
                                 token_ids=list(choice.token_ids) if request.return_token_ids else None,
                                 stats=choice.stats))
        elif item[0] == "error":
            exc = item[1]
            LOG.error("diffgen: error while streaming", exc_info=exc)
            message = exc.message if isinstance(exc, DiffgenError) else \
                f"the server failed: {type(exc).__name__}; see the server's log"
            yield sse(wire.error_body(message, type="server_error", code="internal_error"))
        else:  # "end"
            break
    if request.include_usage and finished:
        yield sse(wire.usage_chunk(request, name, finished, id=id_, created=created))
    yield "data: [DONE]\n\n"


class StepRecords:
    """Host records of a streamed request's steps (``stream_steps``), one choice at a time.

    Each step event becomes the :class:`~diffgen.records.trace.StepRecord` a local run's view and
    trace would get (token texts decoded here, with the model's tokenizer, so that a client needs
    none). The committed canvas, which the contract's canvas item carries only as text, is the
    canvas's last draft with pad after its first EOS: what the loop commits for a row.
    """

    def __init__(self, engine: Engine, choices: int):
        from diffgen.records import trace

        self.texts = trace.TokenTexts(engine.loaded.tokenizer)
        self.eos = set(engine.settings.eos_token_ids)
        self.pad = engine.settings.pad_token_id
        self.last: list[Any] = [None] * choices
        self.count = [0] * choices

    def step(self, index: int, event: Any) -> Any:
        from diffgen.records import trace

        record = next(trace.records([event], self.texts))
        if self.last[index] is not None and self.last[index].canvas != record.canvas:
            self.count[index] = 0
        self.last[index] = record
        self.count[index] += 1
        return record

    def commit(self, index: int) -> Any:
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
