"""The resident model and how a request is generated: :class:`Engine`.

Requests under the fast sampler (``serve``'s default) go to the continuous batcher
(:mod:`diffgen.denoise.batcher`, :meth:`Engine.submit`). Requests the batcher cannot take (the
exact sampler, ``response_format`` json_schema, images) run one at a time through the serial path
(:meth:`Engine.serial_streaming`). One first-come-first-served lock
(:class:`~diffgen.server.admission.FairLock`) guards the model: the serial path holds it for a
whole request, the batcher for one canvas at a time. Both hand their request's typed items
(:mod:`diffgen.server.items`) to a ``put`` callback, and count in the batcher's
:class:`~diffgen.denoise.batcher.Counters` (:meth:`Engine.counters` sums them).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from diffgen.errors import DiffgenError, PromptTooLongError
from diffgen.server import items, wire
from diffgen.server.admission import Admission, FairLock, Reservation
from diffgen.server.answers import Choice, cut_at_stop, finish_reason

if TYPE_CHECKING:
    from diffgen.denoise.batcher import Batcher
    from diffgen.denoise.tickets import Counters, Ticket
    from diffgen.denoise.loop import Completion
    from diffgen.denoise.constrained.schema import SchemaLayout, Vocabulary
    from diffgen.images import VisionInputs
    from diffgen.loading.loader import LoadedModel
    from diffgen.settings import GenerationSettings

DEFAULT_MAX_BATCH = 8  # rows denoised together: each costs ~1.3 GiB of logits-sized memory on the real model
DEFAULT_MAX_QUEUE = 64  # requests waiting to start before new ones get 429
# Images one request may carry: each takes up to ~280 soft tokens of the prompt, so the released
# model's context holds a few dozen at most, and each is decoded in memory (up to 40 MP, ~120 MB).
DEFAULT_MAX_IMAGES = 8

Put = Callable[[items.Item], None]


def new_counters() -> Counters:
    from diffgen.denoise.tickets import Counters

    return Counters()


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
        vocab: the :class:`~diffgen.denoise.constrained.schema.Vocabulary` that ``response_format``
            json_schema requests restrict their value slots to, built at the first such request
            (it reads every token's text once) and kept (``None`` until then).
        max_batch: rows denoised together at most (1: one row at a time, through the batcher).
        max_queue: requests that may wait to start; one more gets 429.
        batcher: the :class:`~diffgen.denoise.batcher.Batcher`, made at the first batched request.
        admission: the queue (:class:`~diffgen.server.admission.Admission`: ``queued``, ``rejected``).
        serial: the serial path's :class:`~diffgen.denoise.batcher.Counters` (requests served and
            failed, rows in flight, decoder passes).
        allow_local_images: ``image_url`` parts may name local files (``serve --allow-local-images``).
        allow_remote_images: ``image_url`` parts may be http(s) URLs, fetched by the server
            (``serve --allow-remote-images``).
        processor: transformers' processor for image requests, built at the first one (``None``
            until then).
        max_steps: the largest ``steps`` a request may ask for (``serve --max-steps``); more is a 422.
        max_images: images one request may carry at most (``serve --max-images``); more is a 422.
    """

    loaded: LoadedModel
    name: str
    settings: GenerationSettings
    exact: Optional[bool] = None
    lock: FairLock = field(default_factory=FairLock)
    vocab: Optional[Vocabulary] = field(default=None, repr=False)
    allow_local_images: bool = False
    allow_remote_images: bool = False
    processor: Any = field(default=None, repr=False)
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    max_steps: int = wire.DEFAULT_MAX_STEPS
    max_images: int = DEFAULT_MAX_IMAGES
    batcher: Optional[Batcher] = field(default=None, repr=False)
    admission: Admission = field(init=False, repr=False)
    serial: Counters = field(default_factory=new_counters, repr=False)
    _making: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the batcher, made once
    _building: threading.Lock = field(default_factory=threading.Lock, repr=False)  # vocab and processor

    def __post_init__(self) -> None:
        self.admission = Admission(self.max_queue)

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
        and on images, and whether the model takes images at all (before any image is read)."""
        # stability too: the sampler keeps that many steps of history per row (a huge value once
        # allocated gigabytes), and a canvas never runs more than max_steps steps anyway.
        for key, name in (("steps", "max_denoising_steps"), ("stability", "stability_threshold")):
            value = request.flags.get(name)
            if value is not None and value > self.max_steps:
                raise wire.invalid(key, f"must be at most {self.max_steps} on this server (got {value}; "
                                        "serve --max-steps sets the bound)")
        if request.images:
            self.screen_images(request)

    def screen_images(self, request: wire.Request) -> None:
        """The model takes images (a vision tower and an image processor's config), and the request
        carries no more than ``max_images``."""
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
        return self.admission.admit()

    def counters(self) -> Counters:
        """Every request's counts: the batcher's and the serial path's, field by field."""
        batch = self.batcher.counters() if self.batcher is not None else new_counters()
        return type(batch)(**{name: value + getattr(self.serial, name) for name, value in vars(batch).items()})

    # -- the batched path ----------------------------------------------------------------------

    def _get_batcher(self) -> Batcher:
        from diffgen.denoise.batcher import Batcher

        with self._making:
            if self.batcher is None:
                self.batcher = Batcher(self.loaded, max_batch=self.max_batch, lock=self.lock)
            return self.batcher

    def submit(self, request: wire.Request, ids: list[int], put: Put,
               reservation: Optional[Reservation] = None) -> Ticket:
        """Hand a batchable request to the batcher; returns its :class:`~diffgen.denoise.batcher.Ticket`
        (``cancel()`` it when the client goes away). ``put`` receives the request's items, from
        the batcher's thread."""
        batcher = self._get_batcher()
        settings = [self.settings_for(request, index) for index in range(request.n)]
        started = time.perf_counter()

        def relay(item: tuple) -> None:
            if item[0] == "end":
                self.admission.finished(time.perf_counter() - started)
            put(self.item(request, ids, item))

        return batcher.submit(ids, settings, relay, observe=request.stream_steps,
                              on_start=reservation.release if reservation is not None else None)

    def item(self, request: wire.Request, ids: list[int], delivered: tuple) -> items.Item:
        """One of the batcher's deliveries as the item it stands for (a row's completion as its choice)."""
        kind, *rest = delivered
        if kind == "step":
            return items.Step(*rest)
        if kind == "canvas":
            return items.Canvas(*rest)
        if kind == "done":
            return items.Done(rest[0], self.choice(request, ids, rest[1]))
        if kind == "error":
            return items.Failed(rest[0])
        return items.End()

    # -- what a request asks for ---------------------------------------------------------------

    def prompt_ids(self, request: wire.Request) -> list[int]:
        """The request's token ids (chat template for chat, the text as is for completions)."""
        from diffgen import prompt as prompt_mod

        tokenizer = self.loaded.tokenizer
        if request.kind == "chat":
            return prompt_mod.encode_messages(tokenizer, request.messages, think=request.think)
        return prompt_mod.encode(tokenizer, request.prompt, raw=True)

    def settings_for(self, request: wire.Request, index: int) -> GenerationSettings:
        return self.settings.replace(**request.flags, seed=request.choice_seed(index))

    def first_settings(self, request: wire.Request) -> GenerationSettings:
        """The first choice's settings; a 422 when they do not go together (e.g. t_min above the
        checkpoint's t_max)."""
        try:
            return self.settings_for(request, 0)
        except DiffgenError as exc:
            param = next((key for key in ("t_min", "t_max") if key in request.flags), None)
            raise wire.invalid(None, exc.message, param=param) from exc

    def check(self, request: wire.Request) -> tuple[list[int], GenerationSettings]:
        """Token ids and the first choice's settings; refusals as :class:`~wire.ApiError`."""
        from diffgen.denoise.loop import check_context

        settings = self.first_settings(request)
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

    def vocabulary(self) -> Vocabulary:
        from diffgen.denoise.constrained import schema as schema_mod

        if self.vocab is not None:  # built: no lock (the model's would wait for a whole generation)
            return self.vocab
        with self._building:  # built once, even when two schema requests arrive together
            if self.vocab is None:
                vocab_size = int(self.loaded.model.config.get_text_config().vocab_size)
                self.vocab = schema_mod.vocabulary(self.loaded.tokenizer, vocab_size, self.settings.pad_token_id)
            return self.vocab

    def schema_layout(self, schema: dict) -> SchemaLayout:
        """The schema laid out on canvases (its length fixes the answer's); a 422 where it cannot be."""
        from diffgen.denoise.constrained import schema as schema_mod

        try:
            return schema_mod.layout(schema, self.loaded.tokenizer, self.vocabulary(),
                                     int(self.loaded.model.config.canvas_length))
        except DiffgenError as exc:
            raise wire.ApiError(422, exc.message, param="response_format", code="unsupported_schema") from exc

    # -- answers -------------------------------------------------------------------------------

    def schema_choice(self, request: wire.Request, ids: list[int], index: int) -> Choice:
        """One choice of a json_schema request: the JSON text as ``run --schema`` generates it (call
        it under the lock). ``token_ids`` are the laid-out positions, pad dropped."""
        from diffgen.denoise.constrained.schema import generate_json
        from diffgen.denoise.options import Execution

        result = generate_json(self.loaded, ids, request.schema, self.settings_for(request, index),
                               execution=Execution(exact=self.exact), vocab=self.vocab)
        pad = self.settings.pad_token_id
        tokens = tuple(token for token in result.token_ids[: result.layout.length] if token != pad)
        return Choice(text=result.text, thoughts=None, finish_reason="stop", token_ids=tokens,
                      prompt_tokens=len(ids), completion_tokens=len(tokens))

    def choice(self, request: wire.Request, ids: list[int], completion: Completion) -> Choice:
        text, stopped = cut_at_stop(completion.text, request.stop)
        return Choice(text=text, thoughts=completion.thoughts,
                      finish_reason=finish_reason(completion.finish_reason, stopped),
                      token_ids=tuple(completion.token_ids), prompt_tokens=len(ids),
                      completion_tokens=len(completion.token_ids),
                      stats=dataclasses.asdict(completion.stats) if completion.stats is not None else None)

    # -- the serial path -----------------------------------------------------------------------

    @contextmanager
    def _serial(self, reservation: Optional[Reservation]) -> Iterator[None]:
        """The serial path's turn: the model lock, the reservation given back, the counts kept."""
        started = time.perf_counter()
        try:
            with self.lock:
                if reservation is not None:
                    reservation.release()
                self.serial.rows_in_flight += 1
                try:
                    yield
                except BaseException:
                    self.serial.requests_failed += 1
                    raise
                else:
                    self.serial.requests_served += 1
                finally:
                    self.serial.rows_in_flight -= 1
        finally:
            if reservation is not None:
                reservation.release()
            self.admission.finished(time.perf_counter() - started)

    def serial_streaming(self, request: wire.Request, ids: list[int], put: Put,
                         reservation: Optional[Reservation] = None, cancelled: Optional[threading.Event] = None,
                         vision: Optional[VisionInputs] = None, canvases: bool = True) -> None:
        """Generate every choice one after the other under the lock (the serial path: ``--exact``,
        json_schema and image requests), calling ``put`` with each choice's items (:mod:`~diffgen.server.items`:
        ``Canvas`` after each committed canvas, ``Done`` at its end; ``Step`` with ``stream_steps``),
        then ``End`` (``Failed`` first if something raised). Stops after the canvas in progress
        once ``cancelled`` is set (the client went away), or as soon as it gets the lock when that
        happened while it waited. ``vision``: the prompt's image inputs (:meth:`check_images`);
        ``canvases``: send the ``Canvas`` items (text so far)."""
        gone = cancelled.is_set if cancelled is not None else (lambda: False)
        try:
            if request.schema is not None:  # the JSON is sent whole, as one delta, once it is generated
                self.vocabulary()
            with self._serial(reservation):
                for index in range(request.n):
                    if gone():  # gone while it waited for the lock
                        return
                    if request.schema is not None:
                        put(items.Done(index, self.schema_choice(request, ids, index)))
                    elif not self._serial_choice(request, ids, index, put, gone, vision, canvases):
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the response, which reports it
            put(items.Failed(exc))
        finally:
            put(items.End())

    def _serial_choice(self, request: wire.Request, ids: list[int], index: int, put: Put,
                       gone: Callable[[], bool], vision: Optional[VisionInputs], canvases: bool) -> bool:
        """Generate choice ``index`` through the loop (under the lock); false when the client went away."""
        from diffgen.denoise.channels import split_response
        from diffgen.denoise.loop import CanvasEvent, Execution, StepEvent, stream

        settings = self.settings_for(request, index)
        generation = stream(self.loaded, [ids], settings, observe=request.stream_steps,
                            execution=Execution(exact=self.exact), vision=[vision] if vision is not None else None)
        eos = set(settings.eos_token_ids)
        tokens: list[int] = []
        for event in generation:
            if isinstance(event, StepEvent):
                put(items.Step(index, event))
            if not isinstance(event, CanvasEvent):
                continue
            self.serial.decoder_forwards += event.steps
            if gone():
                return False
            if not canvases:
                continue
            tokens.extend(event.tokens[0].tolist())
            end = next((i for i, token in enumerate(tokens) if token in eos), len(tokens))
            response = split_response(self.loaded.tokenizer, tokens[: min(end, settings.max_new_tokens)])
            put(items.Canvas(index, response.text, response.thoughts))
        put(items.Done(index, self.choice(request, ids, generation.result.completions[0])))
        return True

    # -- images (``image_url`` parts): the serial path's ---------------------------------------

    def check_images(self, request: wire.Request) -> tuple[list[int], VisionInputs]:
        """Token ids and image inputs of a chat request with images, the context checked: every
        image read and checked, then the conversation through transformers' processor. Refusals
        as :class:`~wire.ApiError` (blocking: run it in a worker thread)."""
        from diffgen import images
        from diffgen.denoise.loop import check_context
        from diffgen.server.images import request_image

        settings = self.first_settings(request)
        read = [request_image(url, where, allow_local=self.allow_local_images, allow_remote=self.allow_remote_images)
                for url, where in request.images]
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
        from diffgen.server.images import unavailable

        if self.processor is not None:  # built: no lock (the model's would wait for a whole generation)
            return self.processor
        with self._building:
            if self.processor is None:
                try:
                    self.processor = images.load_processor(self.loaded.checkpoint.path, self.loaded.tokenizer,
                                                           self.loaded.model.config.to_dict())
                except MissingExtraError as exc:
                    raise unavailable(exc) from exc
                except DiffgenError as exc:
                    raise wire.ApiError(422, f"the model {self.name!r} takes no images: {exc.message}",
                                        param="messages", code="images_unsupported") from exc
            return self.processor
