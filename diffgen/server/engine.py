"""The resident model and how a request is generated: :class:`Engine`.

Every request goes to the continuous batcher's one queue (:mod:`diffgen.denoise.batcher`,
:meth:`Engine.submit`), first come, first served. Requests under the fast sampler (``serve``'s
default) are rows of a batch; those the batch step cannot share (the exact sampler,
``response_format`` json_schema, images) are solo work (:mod:`diffgen.denoise.solo`): once the
batch before them drains, the scheduler runs them alone, one choice after the other. Either way the
request's typed items (:mod:`diffgen.denoise.items`) go to a ``put`` callback from the scheduler
thread, and the batcher's :class:`~diffgen.denoise.tickets.Counters` count them all.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from diffgen.errors import DiffgenError, PromptTooLongError
from diffgen.server import wire
from diffgen.server.admission import Admission, Reservation
from diffgen.server.answers import Choice, cut_at_stop, finish_reason

if TYPE_CHECKING:
    from diffgen.denoise.batcher import Batcher
    from diffgen.denoise.events import Completion
    from diffgen.denoise.items import Item
    from diffgen.denoise.tickets import Counters, SoloWork, Ticket
    from diffgen.denoise.constrained.schema import SchemaLayout, Vocabulary
    from diffgen.images import VisionInputs
    from diffgen.loading.loader import LoadedModel
    from diffgen.settings import GenerationSettings

DEFAULT_MAX_BATCH = 8  # rows denoised together: each costs ~1.3 GiB of logits-sized memory on the real model
DEFAULT_MAX_QUEUE = 64  # requests waiting to start before new ones get 429
# Images one request may carry: each takes up to ~280 soft tokens of the prompt, so the released
# model's context holds a few dozen at most, and each is decoded in memory (up to 40 MP, ~120 MB).
DEFAULT_MAX_IMAGES = 8

Put = Callable[["Item"], None]


@dataclass
class Engine:
    """The resident model and how it generates.

    Attributes:
        loaded: the :class:`~diffgen.loading.loader.LoadedModel`.
        name: the model id clients send and ``/v1/models`` lists.
        settings: the checkpoint's :class:`~diffgen.settings.GenerationSettings`; a request's
            fields replace some of them.
        exact: the loop's ``exact`` argument (``None``: the device's default sampler). Requests
            under the fast sampler are batched; under the exact one they run alone.
        lock: the model's lock, the batcher's: its scheduler holds it around every device
            operation (a canvas of a batch, a solo request); other code that runs this model
            in the process takes it too.
        vocab: the :class:`~diffgen.denoise.constrained.schema.Vocabulary` that ``response_format``
            json_schema requests restrict their value slots to, built at the first such request
            (it reads every token's text once) and kept (``None`` until then).
        max_batch: rows denoised together at most (1: one row at a time).
        max_queue: requests that may wait to start; one more gets 429.
        batcher: the :class:`~diffgen.denoise.batcher.Batcher` every request goes through (its
            scheduler thread starts at the first request).
        admission: the queue (:class:`~diffgen.server.admission.Admission`: ``queued``, ``rejected``).
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
    lock: threading.Lock = field(default_factory=threading.Lock)
    vocab: Optional[Vocabulary] = field(default=None, repr=False)
    allow_local_images: bool = False
    allow_remote_images: bool = False
    processor: Any = field(default=None, repr=False)
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    max_steps: int = wire.DEFAULT_MAX_STEPS
    max_images: int = DEFAULT_MAX_IMAGES
    batcher: Batcher = field(init=False, repr=False)
    admission: Admission = field(init=False, repr=False)
    _building: threading.Lock = field(default_factory=threading.Lock, repr=False)  # vocab and processor

    def __post_init__(self) -> None:
        from diffgen.denoise.batcher import Batcher

        self.admission = Admission(self.max_queue)
        self.batcher = Batcher(self.loaded, max_batch=self.max_batch, lock=self.lock)

    # -- where a request goes ----------------------------------------------------------------

    @property
    def fast(self) -> bool:
        """Whether generations use the fast sampler (``exact=None``: the loop's device default)."""
        if self.exact is None:
            return self.loaded.model.device.type != "cpu"
        return not self.exact

    def batches(self, request: wire.Request) -> bool:
        """Whether ``request``'s choices are rows of a batch (else it runs alone). A batch runs
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
        """Every request's counts: the batcher's."""
        return self.batcher.counters()

    # -- the one path ----------------------------------------------------------------------------

    def submit(self, request: wire.Request, ids: list[int], put: Put, reservation: Optional[Reservation] = None,
               vision: Optional[VisionInputs] = None) -> Ticket:
        """Queue ``request`` in the batcher, as rows of a batch or as solo work; returns its
        :class:`~diffgen.denoise.tickets.Ticket` (``cancel()`` it when the client goes away). ``put``
        receives the request's items from the scheduler thread; ``reservation`` is given back when
        the request leaves the queue. ``vision``: the prompt's image inputs (:meth:`check_images`)."""
        from diffgen.denoise.items import End

        started = time.perf_counter()

        def relay(item: Item) -> None:
            if isinstance(item, End):
                self.admission.finished(time.perf_counter() - started)
            put(item)

        on_start = reservation.release if reservation is not None else None
        if self.batches(request):
            settings = [self.settings_for(request, index) for index in range(request.n)]
            return self.batcher.submit(ids, settings, relay, observe=request.stream_steps, on_start=on_start)
        return self.batcher.submit_solo(self.solo_work(request, ids, vision), request.n, relay, on_start=on_start)

    def solo_work(self, request: wire.Request, ids: list[int], vision: Optional[VisionInputs]) -> SoloWork:
        """How the batcher generates a choice of a request it runs alone, with the sampler chosen
        now: json_schema through the schema generator (the JSON is sent whole, once generated),
        the rest through the loop (``Canvas`` items only when streamed)."""
        from diffgen.denoise import solo
        from diffgen.denoise.options import Execution

        execution = Execution(exact=self.exact)
        if request.schema is not None:
            return lambda index: solo.schema_items(self.loaded, ids, request.schema, self.settings_for(request, index),
                                                   index, execution=execution, vocab=self.vocabulary())
        return lambda index: solo.loop_items(self.loaded, ids, self.settings_for(request, index), index,
                                             observe=request.stream_steps, execution=execution, vision=vision,
                                             canvases=request.stream)

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

    def choice(self, request: wire.Request, ids: list[int], completion: Completion) -> Choice:
        """A choice's completion (a ``Done`` item's) as its answer: cut at the first stop string,
        with OpenAI's finish reason and the prompt's and answer's token counts."""
        text, stopped = cut_at_stop(completion.text, request.stop)
        return Choice(text=text, thoughts=completion.thoughts,
                      finish_reason=finish_reason(completion.finish_reason, stopped),
                      token_ids=tuple(completion.token_ids), prompt_tokens=len(ids),
                      completion_tokens=len(completion.token_ids),
                      stats=dataclasses.asdict(completion.stats) if completion.stats is not None else None)

    # -- images (``image_url`` parts): solo requests ------------------------------------------

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
