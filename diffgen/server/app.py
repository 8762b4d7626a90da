"""The OpenAI-compatible HTTP API over one resident model: ``create_app(engine)`` (routes,
middleware, error objects).

The package is split as vLLM's serving package and llama.cpp's server split theirs: the protocol
(:mod:`~diffgen.server.wire` request bodies in, :mod:`~diffgen.server.answers` response objects
and chunks out, :mod:`~diffgen.server.openapi` the bodies' JSON Schema), the HTTP side (this
module), the queue (:mod:`~diffgen.server.admission`), the serving
(:mod:`~diffgen.server.engine`: the model and the batcher every request goes through;
:mod:`~diffgen.server.images` reads image URLs), and the way back
(:mod:`~diffgen.server.streaming`: the batcher's typed items as server-sent events or collected
choices).

Why FastAPI on uvicorn rather than a hand-written server: the OpenAI API is plain JSON over
HTTP/1.1 plus server-sent events, and Starlette (under FastAPI) already does the parts that are
easy to get subtly wrong — HTTP parsing and keep-alive (uvicorn with h11), streaming responses
that stop when the server shuts down, graceful shutdown on SIGTERM (uvicorn drains in-flight
requests), a thread pool for blocking work, and an OpenAPI schema for free. Both are the stack
that vLLM's and SGLang's OpenAI servers use, so clients' expectations are met by the same code.
The bodies themselves are checked by :mod:`diffgen.server.wire` (not pydantic models) so that the
sampler's fields get the very checks and messages of the CLI.

Concurrency: every request goes through one continuous batcher (:mod:`diffgen.denoise.batcher`),
whose one scheduler thread is the only one that runs the model, first come, first served.
Requests under the fast sampler (``serve``'s default) that arrive together are denoised as rows
of one batch, a request arriving while a batch runs joins it at the next canvas boundary (up to
``--max-batch`` rows), and a row whose client disconnects is dropped at the next boundary.
Requests the batch step cannot share (the exact sampler, ``response_format`` json_schema,
images) run alone on the same thread once the batch before them drains (:meth:`Engine.submit`,
streamed or not); one whose client disconnects stops after its canvas in progress. No thread of
the event loop's pool waits for the model. A request takes its place in the queue
(:meth:`Engine.admit`) before anything of it runs in a thread: its prompt and images are read
only once admitted. Requests waiting to start form the queue; when ``--max-queue`` of them wait,
a new one gets 429 with ``Retry-After``. A request's
``steps`` and images are bounded (``--max-steps``, ``--max-images``: 422 beyond). ``GET
/metrics`` shows the counts in Prometheus' text format (:mod:`diffgen.server.metrics`).

Errors: every refusal is an OpenAI-style error object with its status (400 malformed JSON or a
prompt over the context, 401 a missing or wrong key, 404 unknown model or route, 413 a body over
the limit, 422 bad parameters, 429 a full queue); an unexpected exception in a request becomes a
500 error object (its traceback goes to the server's log, never to the client) and the server
goes on.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffgen.server import answers, openapi, wire
from diffgen.server.engine import Engine
from diffgen.server.streaming import collect, start_work, stream_events

DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes: a full 8k-token context is well under 100 kB of JSON

__all__ = ["ContainFailures", "DEFAULT_MAX_BODY", "Engine", "create_app", "model_card"]


def create_app(engine: Engine, *, api_key: Optional[str] = None, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The ASGI app serving ``engine``. ``api_key``: required as ``Authorization: Bearer KEY`` on
    every ``/v1`` route (``None``: no key); ``max_body``: the largest request body in bytes."""
    from diffgen import __version__

    app = FastAPI(title="diffgen", version=__version__, openapi_url="/openapi.json", docs_url=None, redoc_url=None)
    app.add_middleware(ContainFailures)
    add_error_handlers(app)
    gate = Gate(engine, api_key.encode() if api_key else None, max_body)
    add_info_routes(app, engine, gate)
    add_completion_routes(app, engine, gate)
    openapi.install(app, engine.max_steps)
    return app


def failure(error: wire.ApiError) -> JSONResponse:
    """An :class:`~diffgen.server.wire.ApiError` as its response (a 401 asks for a bearer key)."""
    headers = dict(error.headers or {})
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers or None)


def server_failed(exc: BaseException) -> JSONResponse:
    """The 500 of an unexpected exception (its traceback goes to the log, never to the client)."""
    return JSONResponse(wire.error_body(f"the server failed: {type(exc).__name__}; see the server's log",
                                        type="server_error", code="internal_error"), status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal as an OpenAI-style error object with its status."""

    @app.exception_handler(wire.ApiError)
    async def _api_error(request: Request, exc: wire.ApiError) -> JSONResponse:
        return failure(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return failure(wire.ApiError(exc.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return failure(wire.ApiError(422, str(exc), code="invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this response is sent, and uvicorn logs its traceback: not logged here too.
        return server_failed(exc)


class Gate:
    """What every request passes before it is read further: the API key, the body's size, the model."""

    def __init__(self, engine: Engine, key: Optional[bytes], max_body: int):
        self.engine, self.key, self.max_body = engine, key, max_body

    def authorise(self, request: Request) -> None:
        if self.key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            raise wire.ApiError(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                                type="authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise self.too_large()
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > self.max_body:
                raise self.too_large()
        return wire.parse_body(bytes(data))

    def too_large(self) -> wire.ApiError:
        return wire.ApiError(413, f"the request body is over the limit of {self.max_body} bytes "
                                  "(serve --max-body-size raises it)", code="body_too_large")

    def check_model(self, request: wire.Request) -> None:
        name = self.engine.name
        if request.model is not None and request.model != name:
            raise wire.ApiError(404, f"the model {request.model!r} is not served here; this server serves "
                                     f"{name!r} (GET /v1/models)", param="model", code="model_not_found")


def add_info_routes(app: FastAPI, engine: Engine, gate: Gate) -> None:
    """``/health``, ``/metrics`` and ``/v1/models``."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text format: requests, rows in flight, queue depth, batches, decoder passes, 429s."""
        from diffgen.server.metrics import CONTENT_TYPE, render

        gate.authorise(request)
        return PlainTextResponse(render(engine), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        gate.authorise(request)
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        gate.authorise(request)
        if model_id != engine.name:
            raise wire.ApiError(404, f"the model {model_id!r} is not served here", param="model",
                                code="model_not_found")
        return model_card(engine)


def add_completion_routes(app: FastAPI, engine: Engine, gate: Gate) -> None:
    """``/v1/chat/completions`` and ``/v1/completions``."""

    @app.post("/v1/chat/completions", responses=openapi.ANSWERS)
    async def chat_completions(request: Request) -> Any:
        return await answer(engine, gate, request, wire.parse_chat)

    @app.post("/v1/completions", responses=openapi.ANSWERS)
    async def completions(request: Request) -> Any:
        return await answer(engine, gate, request, wire.parse_text)


async def answer(engine: Engine, gate: Gate, request: Request, parse: Callable[[Any], wire.Request]) -> Any:
    """One completion request: checked, admitted to the queue, then streamed or collected."""
    gate.authorise(request)
    parsed = parse(await gate.read_json(request))
    gate.check_model(parsed)
    engine.screen(parsed)  # the server's bounds, and no images for a text-only model, before the queue
    # A place in the queue (a 429 when it is full) before anything runs in the thread pool: a
    # request that waited for the pool would be in no queue, and nothing would bound the wait.
    reservation = engine.admit()
    try:
        vision = None
        if parsed.images:  # images read and decoded only now, admitted; such requests run alone
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
    return answers.response(parsed, engine.name, choices, id=answers.new_id(parsed.kind), created=answers.now())


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


class ContainFailures:
    """ASGI middleware: an exception that escapes a route becomes a 500 error object, logged with its
    traceback, and the connection stays usable. (Starlette's own last-resort handler re-raises it
    after answering, and uvicorn then closes the keep-alive connection under the client.) Once a
    response has started (a stream), there is nothing else to send: the exception goes on."""

    def __init__(self, app: FastAPI):
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
            await server_failed(exc)(scope, receive, send)
