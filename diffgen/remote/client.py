"""A small client for OpenAI-compatible servers: ``diffgen serve``, vLLM, or any other.

``run --server`` and ``batch --server`` (and ``chat``, against a server) talk HTTP through this
module only. It uses httpx (already a dependency of the server's stack, and thread-safe, so one
:class:`Client` serves a whole concurrent batch) rather than the ``openai`` package, which is a
test-only dependency: the client needs four things from the wire — a JSON POST, a server-sent
event stream, ``GET /v1/models`` and the OpenAI error object — and diffgen's extension fields
(``diffgen_step``, ``diffgen_canvas``, ``diffgen_stats``, ``token_ids``), which are plain keys
of the JSON here.

Everything diffgen-specific is optional: a server without ``diffgen_stats`` gives answers with
``stats=None``, one without ``diffgen_settings`` in its model card gives :class:`ServerModel`
with ``settings=None``; the commands say what they cannot show.

Every failure is a :class:`RemoteError` (a :class:`~diffgen.errors.DiffgenError`: one line on
stderr, exit 1) that names the server and what to do — connection refused, a wrong key, a
server error object, an answer that is not OpenAI's format — or a :class:`Retry` for a server
that is busy (429/503 with ``Retry-After``), which batch jobs wait out.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from diffgen.errors import DiffgenError, UsageError

SERVER_ENV = "DIFFGEN_SERVER"
API_KEY_ENV = "DIFFGEN_API_KEY"
CONNECT_TIMEOUT = 10.0  # seconds to open a connection; reading an answer may take as long as generating it
FINISH_FROM_OPENAI = {"stop": "eos", "length": "length"}


class RemoteError(DiffgenError):
    """The server could not be reached, refused the request or answered something unreadable.

    ``status``: the HTTP status (``None`` when no answer came); ``retryable``: whether the same
    request could succeed later (the server went away or is busy), as opposed to a refusal of
    this request (a bad parameter, a prompt over the context)."""

    def __init__(self, message: str, hint: Optional[str] = None, *, status: Optional[int] = None,
                 retryable: bool = False):
        super().__init__(message, hint)
        self.status = status
        self.retryable = retryable


class Retry(RemoteError):
    """The server is busy (429, or 503 while it starts or drains): try again after ``after`` seconds."""

    def __init__(self, message: str, after: float, status: int):
        super().__init__(message, "try again later", status=status, retryable=True)
        self.after = after


@dataclass(frozen=True)
class ServerModel:
    """A served model as ``GET /v1/models`` describes it.

    Attributes:
        id: the name requests must send.
        settings: diffgen's ``diffgen_settings``: the checkpoint's generation settings as
            :meth:`~diffgen.settings.GenerationSettings.to_dict` (``None``: not a diffgen server).
        channel_ids: the thought channel's (open, close) token ids (``None``: unknown or none).
        canvas_length: tokens per canvas (``None``: not a diffusion server that says so).
    """

    id: str
    settings: Optional[dict[str, Any]]
    channel_ids: Optional[tuple[int, int]]
    canvas_length: Optional[int]


@dataclass(frozen=True)
class Answer:
    """One finished answer from the server.

    Attributes:
        text: the answer (``content`` or ``text``). thoughts: ``reasoning_content`` (``None``:
            none). finish_reason: diffgen's ``eos`` / ``length`` (OpenAI's ``stop`` -> ``eos``).
        token_ids: the generated ids (``None``: the server does not return them).
        model: the model that answered. stats: ``diffgen_stats``, the fields of
            :class:`~diffgen.denoise.loop.CompletionStats` (``None``: not a diffgen server).
        usage: OpenAI's ``usage`` (``None`` if absent). seconds: wall time of the request, measured here.
    """

    text: str
    thoughts: Optional[str]
    finish_reason: str
    token_ids: Optional[tuple[int, ...]]
    model: str
    stats: Optional[dict[str, Any]]
    usage: Optional[dict[str, Any]]
    seconds: float


def base_url(url: str) -> str:
    """The API root (``.../v1``) from what a user types: ``http://host:8000``, ``host:8000/v1/`` ..."""
    url = url.strip().rstrip("/")
    if not url:
        raise UsageError("--server needs a URL, e.g. http://127.0.0.1:8000")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--server {url}: only http:// and https:// servers are supported")
    return url if url.endswith("/v1") else url + "/v1"


class Client:
    """One OpenAI-compatible server. ``url``: as the user gave it; ``api_key``: sent as
    ``Authorization: Bearer`` (default: ``DIFFGEN_API_KEY``); ``timeout``: seconds to wait for
    an answer (``None``: as long as the generation takes)."""

    def __init__(self, url: str, *, api_key: Optional[str] = None, timeout: Optional[float] = None,
                 http: Any = None):
        import httpx

        self.url = base_url(url)
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # ``http``: an httpx.Client to send through instead (tests pass Starlette's TestClient).
        self.http = http if http is not None else httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------

    def models(self) -> list[ServerModel]:
        data = self._json(self._send("GET", "/models"), "/models")
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise RemoteError(f"{self.url}/models did not list models", "is this an OpenAI-compatible server?")
        out = []
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                channel = entry.get("diffgen_channel_ids")
                out.append(ServerModel(id=entry["id"], settings=entry.get("diffgen_settings"),
                                       channel_ids=tuple(channel) if channel else None,
                                       canvas_length=entry.get("canvas_length")))
        return out

    def model(self, name: Optional[str] = None) -> ServerModel:
        """The served model called ``name`` (``None``: the first one the server lists)."""
        models = self.models()
        if not models:
            raise RemoteError(f"{self.url} serves no model")
        if name is None:
            return models[0]
        for model in models:
            if model.id == name:
                return model
        # Servers may answer for names they do not list (aliases): let the request decide.
        return ServerModel(id=name, settings=None, channel_ids=None, canvas_length=None)

    def complete(self, body: dict[str, Any], *, chat: bool) -> Answer:
        """One non-streamed request; its first choice."""
        start = time.perf_counter()
        path = "/chat/completions" if chat else "/completions"
        data = self._json(self._send("POST", path, json=body), path)
        try:
            choice = data["choices"][0]
            message = choice["message"] if chat else choice
            text = message.get("content") if chat else message.get("text")
            # "" (a thought channel opened and left empty) is not None (none opened): keep it apart.
            thoughts = message["reasoning_content"] if "reasoning_content" in message else message.get("reasoning")
            return Answer(text=text or "", thoughts=thoughts,
                          finish_reason=FINISH_FROM_OPENAI.get(choice.get("finish_reason"), "length"),
                          token_ids=_ids(choice.get("token_ids")), model=data.get("model") or body.get("model", ""),
                          stats=choice.get("diffgen_stats"), usage=data.get("usage"),
                          seconds=time.perf_counter() - start)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RemoteError(f"{self.url}{path} answered without a choice ({type(exc).__name__}: {exc})",
                              "is this an OpenAI-compatible server?") from exc

    def stream(self, body: dict[str, Any], *, chat: bool) -> Iterator[dict[str, Any]]:
        """The chunks of a streamed request, parsed, until ``[DONE]``; an error object in the
        stream raises :class:`RemoteError`."""
        import httpx

        path = "/chat/completions" if chat else "/completions"
        try:
            with self.http.stream("POST", self.url + path, json={**body, "stream": True}) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._refusal(response, path)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise RemoteError(f"{self.url}{path} streamed a line that is not JSON: {data[:80]!r}",
                                          "is this an OpenAI-compatible server?") from exc
                    if isinstance(chunk, dict) and "error" in chunk:
                        raise RemoteError(f"the server failed while answering: {_message(chunk)}",
                                          "see the server's log", status=500, retryable=True)
                    yield chunk
                # No [DONE]: the connection closed mid-answer (a server that died or was stopped).
                raise RemoteError(f"the server at {self.url} closed the stream before the answer ended",
                                  "see the server's log; ask again", retryable=True)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # -- internals -----------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, self.url + path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise self._refusal(response, path)
        return response

    def _json(self, response: Any, path: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise RemoteError(f"{self.url}{path} did not answer JSON (HTTP {response.status_code})",
                              "is this an OpenAI-compatible server? --server wants its base URL, e.g. "
                              "http://127.0.0.1:8000") from exc

    def _unreachable(self, exc: Exception) -> RemoteError:
        import httpx

        if isinstance(exc, httpx.ConnectError):
            reason = "connection refused" if "refused" in str(exc).lower() else _first_line(exc)
            return RemoteError(f"cannot reach the server at {self.url}: {reason}",
                               "start it (diffgen serve) or check --server / DIFFGEN_SERVER", retryable=True)
        if isinstance(exc, httpx.TimeoutException):
            return RemoteError(f"the server at {self.url} did not answer in time ({type(exc).__name__})",
                               "check that it is running and not overloaded", retryable=True)
        return RemoteError(f"the connection to {self.url} failed: {type(exc).__name__}: {_first_line(exc)}",
                           "check that the server is still running", retryable=True)

    def _refusal(self, response: Any, path: str) -> RemoteError:
        status = response.status_code
        try:
            message = _message(response.json())
        except ValueError:
            message = _first_line(response.text) or response.reason_phrase
        if status == 401:
            return RemoteError(f"the server at {self.url} refused the API key: {message}",
                               f"set {API_KEY_ENV} to the server's key", status=status)
        if status in (429, 503):
            after = _retry_after(response.headers.get("retry-after"))
            return Retry(f"the server at {self.url} is busy (HTTP {status}): {message}", after, status)
        if status == 404 and path == "/models":
            return RemoteError(f"{self.url}/models was not found (HTTP 404)",
                               "--server wants an OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000",
                               status=status)
        return RemoteError(f"the server refused the request (HTTP {status}): {message}", status=status,
                           retryable=status >= 500)


def _message(data: Any) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return _first_line(str(error["message"]))
    if isinstance(error, str):
        return _first_line(error)
    detail = data.get("detail") if isinstance(data, dict) else None  # FastAPI's default shape
    return _first_line(str(detail if detail is not None else data))


def _retry_after(value: Optional[str]) -> float:
    try:
        after = float(value) if value else 1.0
    except ValueError:
        return 1.0
    return min(max(after, 0.1), 60.0) if math.isfinite(after) else 1.0


def _ids(value: Any) -> Optional[tuple[int, ...]]:
    return tuple(int(token) for token in value) if isinstance(value, list) else None


def _first_line(value: Any, limit: int = 300) -> str:
    text = str(value).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
