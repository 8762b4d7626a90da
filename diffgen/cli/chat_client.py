"""``diffgen chat --server URL``: the chat's turns sent to an OpenAI-compatible server.

A small, self-contained streaming client for ``POST /v1/chat/completions`` (httpx, server-sent
events). Each turn sends the whole conversation: the server keeps no per-conversation cache, so
it encodes the conversation again every turn (the in-process chat reuses its KV cache instead).
``content`` deltas are the answer, ``reasoning_content`` deltas the thoughts. The sampler
settings go as the extra body fields ``diffgen serve`` accepts (``steps``, ``entropy_bound``,
``t_min``, ``t_max``, ``stability``, ``confidence``), with ``max_tokens``, ``seed`` and ``think``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Optional

from diffgen.cli.chat_repl import Reply
from diffgen.errors import DiffgenError

SERVER_ENV = "DIFFGEN_SERVER"


class ServerError(DiffgenError):
    """The server could not be reached, or refused or failed a request."""


def base_url(url: str) -> str:
    """``http://host:port`` from what the user gave (a trailing ``/`` or ``/v1`` is dropped)."""
    from diffgen.errors import UsageError

    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--server {url!r} is not an http(s) URL", "e.g. --server http://127.0.0.1:8000")
    return url


class RemoteChat:
    """A chat backend over HTTP (see :mod:`diffgen.cli.chat_repl` for the protocol).

    ``fields``: body fields sent with every request (sampler settings, ``max_tokens``, ``model``).
    """

    def __init__(self, url: str, *, api_key: Optional[str] = None, fields: Optional[dict[str, Any]] = None,
                 client: Any = None):
        import httpx

        self.url = base_url(url)
        self.fields = dict(fields or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout: a long answer on a slow machine streams nothing for a while between canvases.
        self.client = client or httpx.Client(headers=headers, timeout=httpx.Timeout(None, connect=10.0))

    def reset(self) -> None:
        """Nothing to forget: the server holds no conversation."""

    def describe(self) -> str:
        """``the model at URL`` (asks ``/v1/models``; the URL alone if that fails)."""
        try:
            data = self.client.get(self.url + "/v1/models").json()
            return f"{data['data'][0]['id']} at {self.url}"
        except Exception:  # noqa: BLE001 - only a greeting: the first turn reports real failures
            return self.url

    def reply(self, messages: list[dict[str, str]], *, think: bool, seed: Optional[int]) -> Iterator[tuple[str, Any]]:
        import httpx

        body = {**self.fields, "messages": messages, "stream": True, "think": think}
        if seed is not None:
            body["seed"] = seed
        text, thoughts, finish = [], [], None
        try:
            with self.client.stream("POST", self.url + "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise ServerError(f"the server answered {response.status_code}: {_error_message(response)}")
                for data in _events(response.iter_lines()):
                    if "error" in data:
                        raise ServerError(f"the server failed: {_message(data)}")
                    for choice in data.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if delta.get("reasoning_content"):
                            thoughts.append(delta["reasoning_content"])
                            yield "thought", delta["reasoning_content"]
                        if delta.get("content"):
                            text.append(delta["content"])
                            yield "answer", delta["content"]
                        finish = choice.get("finish_reason") or finish
        except httpx.TransportError as exc:
            raise ServerError(f"cannot reach the server at {self.url}: {exc}",
                              "start one with `diffgen serve`, or check --server / DIFFGEN_SERVER") from exc
        yield "done", Reply(text="".join(text).strip(), thoughts="".join(thoughts) or None,
                            finish_reason=finish or "stop")


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to ``data: [DONE]``."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ServerError(f"the server sent an event that is not JSON: {payload[:80]!r}") from exc


def _error_message(response: Any) -> str:
    try:
        return _message(response.json())
    except ValueError:
        return response.text[:200] or response.reason_phrase


def _message(data: Any) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return json.dumps(data)[:200]
