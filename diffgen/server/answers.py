"""The OpenAI wire format's answers: finished choices, whole response objects, stream chunks
(with diffgen's ``diffgen_step``/``diffgen_canvas`` extensions) and the deltas a streamed choice sends.

Plain dicts and frozen dataclasses, no web framework (the requests' side is :mod:`diffgen.server.wire`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

from diffgen.server.wire import Request

def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string (and whether one was found)."""
    cuts = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def finish_reason(reason: str, stopped: bool) -> str:
    """diffgen's ``eos``/``length`` as OpenAI's ``stop``/``length`` (a stop string is ``stop``)."""
    return "stop" if stopped or reason == "eos" else "length"


@dataclass(frozen=True)
class Choice:
    """One finished choice. Attributes: ``text`` the answer (cut at a stop string);
    ``thoughts`` the thought channel (``None``: none opened); ``finish_reason`` OpenAI's;
    ``token_ids`` the generated ids; ``prompt_tokens``/``completion_tokens`` counts;
    ``stats`` the choice's :class:`~diffgen.denoise.loop.CompletionStats` as
    ``dataclasses.asdict`` (sent as ``diffgen_stats``; ``None``: none, nothing sent)."""

    text: str
    thoughts: Optional[str]
    finish_reason: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    stats: Optional[dict[str, Any]] = None


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(choices: list[Choice]) -> dict[str, int]:
    prompt = choices[0].prompt_tokens if choices else 0
    completion = sum(choice.completion_tokens for choice in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(request: Request, model: str, choices: list[Choice], *, id: str, created: int) -> dict[str, Any]:
    """The whole (non-streamed) answer object."""
    out = []
    for index, choice in enumerate(choices):
        if request.kind == "chat":
            item: dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": choice.text,
                                                                "reasoning_content": choice.thoughts},
                                    "finish_reason": choice.finish_reason, "logprobs": None}
        else:
            item = {"index": index, "text": choice.text, "reasoning_content": choice.thoughts,
                    "finish_reason": choice.finish_reason, "logprobs": None}
        if request.return_token_ids:
            item["token_ids"] = list(choice.token_ids)
        if choice.stats is not None:
            item["diffgen_stats"] = choice.stats
        out.append(item)
    return {"id": id, "object": "chat.completion" if request.kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": out, "usage": usage(choices)}


def chunk(request: Request, model: str, *, id: str, created: int, index: int, content: Optional[str] = None,
          reasoning: Optional[str] = None, role: bool = False, finish_reason: Optional[str] = None,
          token_ids: Optional[list[int]] = None, stats: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One streamed chunk: a delta of the answer and/or the thoughts, or the finish (which carries
    ``token_ids`` when asked and the choice's ``diffgen_stats`` when known)."""
    if request.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if content is not None:
            delta["content"] = content
        if reasoning is not None:
            delta["reasoning_content"] = reasoning
        item: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        item = {"index": index, "text": content or "", "finish_reason": finish_reason, "logprobs": None}
        if reasoning is not None:
            item["reasoning_content"] = reasoning
        kind = "text_completion"
    if token_ids is not None:
        item["token_ids"] = token_ids
    if stats is not None:
        item["diffgen_stats"] = stats
    return {"id": id, "object": kind, "created": created, "model": model, "choices": [item]}


def extension_chunk(request: Request, model: str, *, id: str, created: int, index: int, name: str,
                    payload: dict[str, Any], role: bool = False) -> dict[str, Any]:
    """An ordinary chunk of choice ``index`` with nothing in its delta, carrying ``payload`` as
    the top-level field ``name`` (``diffgen_step`` or ``diffgen_canvas``): OpenAI clients see an
    empty delta (or only the role, in a chat's first chunk) and go on; diffgen's own clients draw
    the denoising from it."""
    out = chunk(request, model, id=id, created=created, index=index, role=role)
    out[name] = {"index": index, **payload}
    return out


def usage_chunk(request: Request, model: str, choices: list[Choice], *, id: str, created: int) -> dict[str, Any]:
    """``stream_options.include_usage``: the last chunk, no choices, the usage."""
    kind = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {"id": id, "object": kind, "created": created, "model": model, "choices": [], "usage": usage(choices)}


class Deltas:
    """Turns a choice's growing text (after each committed canvas) into the deltas to send.

    A delta is what the text gained since the last one sent. Text that a later canvas might
    still change is held back: the tail that could begin a stop string, and a trailing U+FFFD
    (a character whose bytes are split across canvases). When a stop string appears, the text
    is cut before it and :attr:`stopped` turns true; nothing more is sent for that choice.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.sent = ""
        self.stopped = False

    def update(self, text: str, *, final: bool = False) -> str:
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(text, self.stops)
        if not final and not self.stopped:
            text = text.rstrip("\ufffd")
            text = text[: max(len(self.sent), len(text) - self.hold)] if self.hold else text
        if not text.startswith(self.sent):
            return ""  # an earlier character changed (a split multibyte character): wait for the end
        delta, self.sent = text[len(self.sent):], text
        return delta


def now() -> int:
    return int(time.time())
