"""``diffgen serve``: load the model once, then answer OpenAI-compatible requests over HTTP.

The load follows exactly ``run``'s plan (:func:`~diffgen.loading.prepare.prepare` and
:func:`~diffgen.loading.prepare.load_prepared`); the API is :mod:`diffgen.server.app`, on uvicorn.
FastAPI and uvicorn are imported only when the command runs, so ``diffgen --help`` stays instant.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import os
from typing import Annotated, Any, Optional

import typer

from diffgen.cli.support.common import exclusive, load_model, offload_note
from diffgen.cli.support.funnel import doing
from diffgen.cli.support.options import (
    DEFAULT_MODEL,
    DeviceOption,
    MaxMemoryOption,
    ModelOption,
    NoColorOption,
    OffloadOption,
    OfflineOption,
    QuantOption,
    QuietOption,
)
from diffgen.errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "DIFFGEN_API_KEY"

EPILOG = (
    "Examples:\n\n"
    "  diffgen serve                                  (http://127.0.0.1:8000/v1, this machine only)\n\n"
    "  DIFFGEN_API_KEY=secret diffgen serve --host 0.0.0.0 --port 8000   (other machines: a key is required)\n\n"
    "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
    "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"seed\": 1}'\n\n"
    "Endpoints: GET /health, GET /metrics, GET /v1/models, POST /v1/chat/completions, POST /v1/completions "
    "(OpenAI wire format; stream: true answers as server-sent events, one delta per committed canvas). "
    "Thoughts come in reasoning_content, never in content. Sampler settings are extra body fields named "
    "as in batch records: steps, entropy_bound, t_min, t_max, stability, confidence; plus max_tokens, "
    "stop, seed and n. Extensions: stream_steps (with stream) sends every denoising step, which "
    "`diffgen run --server URL --show-steps` draws; each choice carries diffgen_stats. Requests that arrive together are denoised together as rows of one batch "
    "(--max-batch); a request arriving later joins at the next canvas boundary, and a client that "
    "disconnects frees its row there. When --max-queue requests wait, new ones get 429 with Retry-After. "
    "--exact answers token for token as 'diffgen run --exact --seed' does, one request at a time. "
    "/metrics has Prometheus counters (requests, rows in flight, queue depth, batches, decoder passes, 429s). "
    "SIGTERM or Ctrl-C lets the requests in flight finish, then stops."
)


def serve(
    ctx: typer.Context,
    model: ModelOption = DEFAULT_MODEL,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on. Any address but loopback needs an API key."),
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="TCP port to listen on.")] = DEFAULT_PORT,
    api_key: Annotated[
        Optional[str],
        typer.Option("--api-key", envvar=API_KEY_ENV, show_envvar=True, show_default="none",
                     help="Require 'Authorization: Bearer KEY' on every /v1 request (prefer the environment "
                          "variable: a flag shows in the process list)."),
    ] = None,
    max_body_size: Annotated[
        int,
        typer.Option("--max-body-size", min=1024, metavar="<bytes>",
                     help="Largest request body accepted; larger ones get 413."),
    ] = 4 * 1024 * 1024,
    allow_local_images: Annotated[
        bool,
        typer.Option("--allow-local-images", help="Let image_url parts name files on this machine (file:// or an "
                                                  "absolute path), read with the server's permissions."),
    ] = False,
    allow_remote_images: Annotated[
        bool,
        typer.Option("--allow-remote-images", help="Let image_url parts be http(s) URLs, which the server fetches "
                                                   "(data: URLs are always accepted). This lets any client make the "
                                                   "server fetch any URL it can reach, addresses inside its own "
                                                   "network included: use it only with clients you trust."),
    ] = False,
    max_batch: Annotated[
        int,
        typer.Option("--max-batch", min=1, metavar="<rows>",
                     help="Rows (choices) denoised together at most; 1 answers one at a time. Each row costs "
                          "about 1.3 GiB of sampler memory on the released model."),
    ] = 8,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", min=1, metavar="<requests>",
                     help="Requests that may wait to start; one more gets 429 with Retry-After."),
    ] = 64,
    max_steps: Annotated[
        int,
        typer.Option("--max-steps", min=1, max=1024, metavar="<steps>",
                     help="Largest 'steps' (and 'stability') a request may ask for; more gets 422. Each step "
                          "is a decoder pass per canvas, and a request holds the model (and the queue behind it) "
                          "until it ends."),
    ] = 256,
    max_images: Annotated[
        int,
        typer.Option("--max-images", min=1, metavar="<images>",
                     help="Images one request may carry; more gets 422. Each is decoded in memory and takes up to "
                          "~280 tokens of the context."),
    ] = 8,
    device: DeviceOption = "auto",
    exact: Annotated[
        bool,
        typer.Option("--exact", help="Sampler: reproduce transformers' generate() token for token, as "
                                     "'diffgen run --exact --seed' does; requests run one at a time (no batching)."),
    ] = False,
    fast: Annotated[
        bool,
        typer.Option("--fast", show_default="on",
                     help="Sampler: the fast one (Gumbel-max sampling), whose requests are batched together."),
    ] = False,
    quant: QuantOption = "auto",
    max_memory: MaxMemoryOption = None,
    offload: OffloadOption = False,
    offline: OfflineOption = False,
    quiet: QuietOption = False,
    no_color: NoColorOption = False,
) -> None:
    """Keep the model loaded and answer OpenAI-compatible requests (chat, completions, streaming)."""
    exact, fast = exclusive(ctx, "give one of them, or neither for the fast sampler", exact=exact, fast=fast)
    # A server exists for throughput: the fast sampler (batched) on every device unless --exact.
    exact_loop = bool(exact)
    if api_key is not None and api_key and not api_key.strip():
        raise UsageError("--api-key is blank: clients could send it by mistake", f"give a real key (or unset {API_KEY_ENV})")
    api_key = api_key or None
    if not is_loopback(host) and not api_key:
        raise UsageError(f"--host {host} would let other machines use this server without a key",
                         f"set {API_KEY_ENV} (or --api-key), or keep the default --host {DEFAULT_HOST}")

    from diffgen.loading.prepare import prepare
    from diffgen.ui import render

    console = render.error_console()
    # The port is taken before the weights are read: a busy port is one line, not a long load first.
    listening = bind(host, port)
    with doing("planning the load"):
        prepared = prepare(model, offline=offline, device=device, quant=quant, max_memory=max_memory,
                           offload=offload)
    offload_note(prepared, offload, quiet=quiet)
    loaded = load_model(prepared, console, quiet=quiet)

    with doing("starting the server"):
        import uvicorn

        from diffgen.server.app import create_app
        from diffgen.server.engine import Engine

        engine = Engine(loaded=loaded, name=model, settings=prepared.settings, exact=exact_loop,
                        max_batch=max_batch, max_queue=max_queue, max_steps=max_steps, max_images=max_images,
                        allow_local_images=allow_local_images, allow_remote_images=allow_remote_images)
        app = create_app(engine, api_key=api_key, max_body=max_body_size)
        shown = f"[{host}]" if ":" in host else host
        if not quiet:
            typer.echo(f"diffgen: serving {model} on http://{shown}:{port}/v1"
                       + (" (API key required)" if api_key else ""), err=True)
        config = uvicorn.Config(app, host=host, port=port, log_config=log_config(),
                                log_level="warning" if quiet else "info", timeout_graceful_shutdown=None)
        uvicorn.Server(config).run(sockets=[listening])


def bind(host: str, port: int) -> Any:
    """A TCP socket bound to ``host``:``port`` (uvicorn listens on it); a port in use or an address
    this machine does not have is a :class:`DiffgenError` saying so."""
    import socket

    from diffgen.errors import DiffgenError

    address = host.strip("[]")
    # As uvicorn binds: IPv6 when the host has a colon, else IPv4 (a name resolves through the OS).
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except (socket.gaierror, UnicodeError) as exc:
        sock.close()
        raise UsageError(f"--host {host}: no such address on this machine ({exc})",
                         "give an IP address or a host name of this machine") from exc
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        hint = ("another program is listening there: stop it, or pick another port with --port"
                if exc.errno == errno.EADDRINUSE else "check --host and --port")
        raise DiffgenError(f"cannot listen on {shown}:{port}: {exc.strerror or exc}", hint) from exc
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def log_config() -> dict:
    """uvicorn's logging, all on stderr (its access log defaults to stdout, which is for answers),
    with diffgen's own server log beside it."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["diffgen.server"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    if os.environ.get("NO_COLOR"):
        for formatter in config["formatters"].values():
            formatter["use_colors"] = False
    return config
