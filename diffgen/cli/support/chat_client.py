"""``diffgen chat --server URL``: the chat's turns sent to an OpenAI-compatible server.

The HTTP side is :class:`diffgen.remote.client.Client` (the client of ``run --server`` and
``batch --server``: server-sent events, refusals and unreachable servers as one-line errors).
Each turn sends the whole conversation: the server keeps no per-conversation cache, so it
encodes the conversation again every turn (the in-process chat reuses its KV cache instead).
``content`` deltas are the answer, ``reasoning_content`` deltas the thoughts. The sampler
settings go as the extra body fields ``diffgen serve`` accepts (``steps``, ``entropy_bound``,
``t_min``, ``t_max``, ``stability``, ``confidence``), with ``max_tokens``, ``seed`` and
``chat_template_kwargs.enable_thinking`` (the name vLLM and diffgen both read).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from diffgen.cli.support.chat_repl import Reply
from diffgen.errors import DiffgenError


class RemoteChat:
    """A chat backend over HTTP (see :mod:`diffgen.cli.support.chat_repl` for the protocol).

    ``fields``: body fields sent with every request (sampler settings, ``max_tokens``, ``model``);
    ``client``: an httpx client to send through (tests pass Starlette's TestClient).
    """

    def __init__(self, url: str, *, api_key: Optional[str] = None, fields: Optional[dict[str, Any]] = None,
                 client: Any = None):
        from diffgen.remote.client import Client

        self.client = Client(url, api_key=api_key, http=client)
        self.fields = dict(fields or {})

    def reset(self) -> None:
        """Nothing to forget: the server holds no conversation."""

    def describe(self) -> str:
        """``MODEL at URL`` (asks ``/v1/models``; the URL alone if that fails)."""
        try:
            return f"{self.client.model(self.fields.get('model')).id} at {self.client.url}"
        except DiffgenError:  # only a greeting: the first turn reports real failures
            return self.client.url

    def reply(self, messages: list[dict[str, str]], *, think: bool, seed: Optional[int]) -> Iterator[tuple[str, Any]]:
        body = {**self.fields, "messages": messages, "chat_template_kwargs": {"enable_thinking": think}}
        if seed is not None:
            body["seed"] = seed
        text, thoughts, finish = [], [], None
        for data in self.client.stream(body, chat=True):
            for choice in data.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("reasoning_content"):
                    thoughts.append(delta["reasoning_content"])
                    yield "thought", delta["reasoning_content"]
                if delta.get("content"):
                    text.append(delta["content"])
                    yield "answer", delta["content"]
                finish = choice.get("finish_reason") or finish
        yield "done", Reply(text="".join(text).strip(), thoughts="".join(thoughts) or None,
                            finish_reason=finish or "stop")
