"""Prompts and flags as OpenAI request bodies; answers as the records a local run writes.

A chat request (the chat template applied by the server) carries ``messages`` and, for
thinking mode, ``chat_template_kwargs.enable_thinking`` (the name vLLM and diffgen both read);
``--raw`` becomes a plain ``/v1/completions`` request. The sampler flags go as extra body
fields under their batch-record names (``steps``, ``entropy_bound``, ...), ``--max-new-tokens``
as ``max_tokens``; ``return_token_ids`` asks for the generated ids (vLLM's name too). A server
that ignores an extra field answers with its own defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional

from diffgen.remote.client import FINISH_FROM_OPENAI, Answer, Client, RemoteError, ServerModel
from diffgen.settings import SAMPLER_FLAGS, GenerationSettings

if TYPE_CHECKING:
    from diffgen.records.trace import Record


def body(model: str, text: str, *, system: Optional[str], think: bool, raw: bool, flags: dict[str, Any],
         seed: int, image_urls: tuple[str, ...] = ()) -> tuple[dict[str, Any], bool]:
    """The request body for one prompt and whether it goes to the chat endpoint. ``flags``: the
    sampler settings given, by :class:`~diffgen.settings.GenerationSettings` field name;
    ``image_urls``: ``image_url`` parts put before the text, where a local run puts the images."""
    out: dict[str, Any] = {"model": model, "seed": seed, "return_token_ids": True, **sampler_fields(flags)}
    if raw:
        return {**out, "prompt": text}, False
    content: Any = text
    if image_urls:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
        content += [{"type": "text", "text": text}] if text else []
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    out["messages"] = messages
    if think:
        out["chat_template_kwargs"] = {"enable_thinking": True}
    return out, True


def sampler_fields(flags: dict[str, Any]) -> dict[str, Any]:
    """The sampler flags given (by :class:`~diffgen.settings.GenerationSettings` field name) as
    body fields: ``max_tokens`` and the extra fields under their batch-record names."""
    return {"max_tokens" if flag.field == "max_new_tokens" else flag.key: flags[flag.field]
            for flag in SAMPLER_FLAGS if flags.get(flag.field) is not None}


def settings(model: ServerModel, flags: dict[str, Any], seed: int) -> dict[str, Any]:
    """The settings a record reports: the server's defaults with ``flags`` and ``seed`` applied, as
    a local run reports them; only ``flags`` and ``seed`` when the server does not say its defaults."""
    if model.settings is None:
        return {**{field: value for field, value in flags.items() if value is not None}, "seed": seed}
    known = {key: value for key, value in model.settings.items() if key in GenerationSettings.__dataclass_fields__}
    if isinstance(known.get("eos_token_ids"), list):
        known["eos_token_ids"] = tuple(known["eos_token_ids"])
    return GenerationSettings(**known).replace(**flags, seed=seed).to_dict()


def record(answer: Answer, *, model: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON object of :func:`diffgen.ui.render.completion_record`, from a server's answer:
    ``tokens`` and ``stats`` are ``None`` where the server does not return them."""
    return {
        "text": answer.text,
        "thoughts": answer.thoughts,
        "tokens": list(answer.token_ids) if answer.token_ids is not None else None,
        "finish_reason": answer.finish_reason,
        "model": model,
        "seed": seed,
        "settings": settings,
        "stats": answer.stats,
    }


def stream_answer(client: Client, request: dict[str, Any], *, chat: bool,
                  on_record: Optional[Callable[[Record], None]] = None) -> Answer:
    """Stream one request (with ``stream_steps`` when ``on_record`` is given, which then gets the
    :class:`~diffgen.records.trace.StepRecord` and :class:`~diffgen.records.trace.CanvasRecord` of
    each step and committed canvas); the answer its chunks add up to."""
    import time

    start = time.perf_counter()
    if on_record is not None:
        from diffgen.records.trace import CanvasRecord, StepRecord

        request = {**request, "stream_steps": True}
    text, thoughts = [], []
    finish, token_ids, stats, usage, model = None, None, None, None, request.get("model", "")
    for chunk in _first_choice_chunks(client.stream(request, chat=chat)):
        model = chunk.get("model") or model
        usage = chunk.get("usage") or usage
        if on_record is not None and isinstance(chunk.get("diffgen_step"), dict):
            on_record(StepRecord.from_stream(chunk["diffgen_step"]))
        if on_record is not None and isinstance(chunk.get("diffgen_canvas"), dict):
            on_record(CanvasRecord.from_stream(chunk["diffgen_canvas"]))
        if not chunk.get("choices"):
            continue
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {} if chat else choice
        text.append((delta.get("content") if chat else delta.get("text")) or "")
        thoughts.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
        if choice.get("finish_reason"):
            finish = choice["finish_reason"]
            token_ids = choice.get("token_ids", token_ids)
            stats = choice.get("diffgen_stats", stats)
    if finish is None:
        raise RemoteError(f"the stream from {client.url} ended without a finish reason",
                          "the server may have stopped; see its log", retryable=True)
    joined = "".join(thoughts)
    # Deltas cannot tell an empty thought channel from none: an empty one is reported as none.
    return Answer(text="".join(text), thoughts=joined or None,
                  finish_reason=FINISH_FROM_OPENAI.get(finish, "length"),
                  token_ids=tuple(token_ids) if isinstance(token_ids, list) else None, model=model,
                  stats=stats, usage=usage, seconds=time.perf_counter() - start)


def _first_choice_chunks(chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Chunks of choice 0 (and those without choices: usage)."""
    for chunk in chunks:
        choices = chunk.get("choices") or []
        if not choices or choices[0].get("index", 0) == 0:
            yield chunk
