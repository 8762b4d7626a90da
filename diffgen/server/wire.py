"""The OpenAI wire format: request bodies in, checked; response objects and stream chunks out.

Plain dicts and frozen dataclasses, no web framework: :mod:`diffgen.server.app` calls these, and
tests call them directly. Every refusal is an :class:`ApiError`, which the app turns into an
OpenAI-style error object ``{"error": {"message", "type", "param", "code"}}`` with its status.

Sampler settings come as extra body fields under the same names as a batch record or the config
file (:data:`diffgen.settings.SAMPLER_FLAGS`' keys: ``steps``, ``entropy_bound``, ``t_min``,
``t_max``, ``stability``, ``confidence``) and go through the same checks as the CLI's flags
(:func:`diffgen.settings.field_problem`). OpenAI's own ``max_tokens`` (or
``max_completion_tokens``), ``stop``, ``seed``, ``n`` and ``stream`` behave as its clients expect;
``temperature``/``top_p`` and other fields this sampler has no use for are ignored, as most
OpenAI-compatible servers do, while fields whose meaning cannot be honoured (``logprobs``,
``tools``) are refused rather than silently dropped.

``response_format``: ``{"type": "text"}`` (or none) is plain text; ``{"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}`` answers with JSON valid by construction for the
schema (:mod:`diffgen.denoise.schema`, the machinery of ``run --schema``, whatever ``strict``
says); a schema outside that subset is a 422 naming what it uses. ``{"type": "json_object"}``
is refused (422): with no schema there is no skeleton to lay out, and ``{"type": "object"}``
alone would only ever answer ``{}``. The schema fixes the answer's length, so ``max_tokens`` is
not applied to it, and ``stop`` and thinking mode are refused with it (either would break the JSON).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

from diffgen.settings import SAMPLER_FLAGS, SEED_LIMIT, field_problem

MAX_CHOICES = 8  # ``n`` at most: each choice is one more row of a batch (or one more generation, serially)
MAX_STOP = 4  # OpenAI's own limit on stop sequences
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A refusal with its HTTP status and OpenAI error fields.

    Attributes: ``status`` the HTTP status; ``message`` what is wrong and what to do; ``type``
    OpenAI's error type (``invalid_request_error``, ``authentication_error``, ``server_error``);
    ``param`` the body field at fault (``None`` when none); ``code`` a short machine-readable code;
    ``headers`` extra response headers (e.g. ``Retry-After``).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def queue_full(queued: int, retry_after: int) -> ApiError:
    """The 429 of a full queue, with ``Retry-After`` (seconds) and OpenAI's rate-limit error fields."""
    return ApiError(429, f"the server is busy: {queued} requests are already waiting; retry after "
                         f"{retry_after} s (serve --max-queue sets how many may wait)", type="requests",
                    code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})


def invalid(name: Optional[str], message: str, code: str = "invalid_value", *,
            param: Optional[str] = None) -> ApiError:
    """A 422 for a body field (``name``, also the message's prefix) that has the wrong type or value;
    ``param`` names the field without prefixing the message."""
    return ApiError(422, f"{name}: {message}" if name else message, param=name or param, code=code)


@dataclass(frozen=True)
class Request:
    """One checked completion request, chat or plain.

    Attributes:
        kind: ``"chat"`` (``/v1/chat/completions``) or ``"text"`` (``/v1/completions``).
        model: the model the client named (``None``: the served one).
        messages: the chat turns, roles normalised (``developer`` -> ``system``); empty for text.
        prompt: the raw prompt of a plain completion (no chat template); ``None`` for chat.
        think: thinking mode for the chat template (``think`` or
            ``chat_template_kwargs.enable_thinking``).
        flags: generation settings by :class:`~diffgen.settings.GenerationSettings` field name,
            only those the client gave (``max_new_tokens`` from ``max_tokens``).
        seed: the seed of the first choice; choice ``i`` uses ``seed + i``. Drawn at random when
            the client gave none.
        n: choices to generate, 1 to :data:`MAX_CHOICES`.
        stop: strings that end the answer where they first appear (not included).
        stream: answer as server-sent events.
        include_usage: ``stream_options.include_usage``: a last chunk with the usage.
        return_token_ids: extension (vLLM's name): each choice also carries its ``token_ids``.
        schema: ``response_format``'s JSON Schema (checked to be inside the supported subset);
            ``None``: a plain-text answer.
    """

    kind: str
    model: Optional[str]
    messages: tuple[dict[str, str], ...]
    prompt: Optional[str]
    think: bool
    flags: dict[str, Any]
    seed: int
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    schema: Optional[dict[str, Any]] = None

    def choice_seed(self, index: int) -> int:
        return (self.seed + index) % SEED_LIMIT


def parse_chat(body: Any) -> Request:
    """Check a ``/v1/chat/completions`` body."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of {role, content} objects",
                      code="missing_value" if messages is None else "invalid_value")
    turns = tuple(_message(index, message) for index, message in enumerate(messages))
    think = _bool(body, "think", False)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise invalid("chat_template_kwargs", "must be an object")
        if "enable_thinking" in kwargs:
            think = _bool(kwargs, "enable_thinking", False, name="chat_template_kwargs.enable_thinking")
    return _common(body, "chat", messages=turns, prompt=None, think=think)


def parse_text(body: Any) -> Request:
    """Check a ``/v1/completions`` body (the prompt is sent as is, no chat template)."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt", "must be a string (one prompt per request)",
                      code="missing_value" if prompt is None else "invalid_value")
    if not prompt:
        raise invalid("prompt", "must not be empty")
    return _common(body, "text", messages=(), prompt=prompt, think=False)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _message(index: int, message: Any) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(where, "must be an object with role and content")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"must be one of {', '.join(ROLES)} (got {role!r})")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for number, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}.content[{number}]", "only text parts ({type: text, text}) are supported")
            parts.append(part["text"])
        content = "\n".join(parts)
    if not isinstance(content, str):
        raise invalid(f"{where}.content", "must be a string or a list of text parts")
    return {"role": ROLES[role], "content": content}


def _bool(body: dict[str, Any], key: str, default: bool, *, name: Optional[str] = None) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name or key, f"must be true or false (got {value!r})")
    return value


def _int(body: dict[str, Any], key: str) -> Optional[int]:
    value = body.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise invalid(key, f"must be an integer (got {value!r})")
    return value


def _common(body: dict[str, Any], kind: str, *, messages: tuple[dict[str, str], ...], prompt: Optional[str],
            think: bool) -> Request:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "must be a string")
    for key in ("logprobs", "echo"):
        if body.get(key) not in (None, False, 0):
            raise invalid(key, "is not supported by diffgen's sampler", code="unsupported")
    if body.get("tools"):
        raise invalid("tools", "tool calling is not supported", code="unsupported")

    flags: dict[str, Any] = {}
    for flag in SAMPLER_FLAGS:
        if flag.key in body and body[flag.key] is not None:
            flags[flag.field] = _sampler_value(flag, body[flag.key])
    given = [key for key in ("max_tokens", "max_completion_tokens") if body.get(key) is not None]
    if given:
        if "max_new_tokens" in flags or len(given) > 1:
            raise invalid(given[0], "give one of max_tokens, max_completion_tokens and max_new_tokens")
        value = body[given[0]]
        problem = field_problem("max_new_tokens", value) if _number_type(value, (int,)) else \
            f"must be a positive integer (got {value!r})"
        if problem:
            raise invalid(given[0], problem)
        flags["max_new_tokens"] = value
    t_min, t_max = flags.get("t_min"), flags.get("t_max")
    if t_min is not None and t_max is not None and t_max <= t_min:
        raise invalid("t_max", f"must be greater than t_min (got t_max {t_max}, t_min {t_min})")

    seed = body.get("seed")
    if seed is not None:
        problem = field_problem("seed", seed) if _number_type(seed, (int,)) else f"must be an integer (got {seed!r})"
        if problem:
            raise invalid("seed", problem)
    else:
        seed = secrets.randbelow(2**31)
    n = _int(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise invalid("n", f"must be from 1 to {MAX_CHOICES} (got {n})")
    stop = _stop(body.get("stop"))
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options", "must be an object")
        include_usage = _bool(options, "include_usage", False, name="stream_options.include_usage")
    schema = _response_format(body.get("response_format"))
    if schema is not None:
        if think:
            raise invalid(None, "response_format json_schema does not combine with thinking mode yet; "
                                "drop think / chat_template_kwargs.enable_thinking", param="response_format")
        if stop:
            raise invalid("stop", "does not combine with response_format json_schema (a stop string would cut "
                                  "the JSON); drop stop")
    return Request(kind=kind, model=model, messages=messages, prompt=prompt, think=think, flags=flags, seed=seed,
                   n=n, stop=stop, stream=stream, include_usage=include_usage,
                   return_token_ids=_bool(body, "return_token_ids", False), schema=schema)


def _response_format(value: Any) -> Optional[dict[str, Any]]:
    """``response_format``'s schema: ``None`` for text, the checked schema for ``json_schema``."""
    from diffgen.denoise.schema import check_schema
    from diffgen.errors import UsageError

    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid("response_format", "must be an object such as {\"type\": \"json_schema\", ...}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        raise invalid("response_format", "json_object needs a schema here: send {\"type\": \"json_schema\", "
                                         "\"json_schema\": {\"name\": ..., \"schema\": {...}}}", code="unsupported")
    if kind != "json_schema":
        raise invalid("response_format.type", f"must be text or json_schema (got {kind!r})", param="response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("response_format.json_schema", "must be an object with name and schema",
                      code="missing_value" if spec is None else "invalid_value")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid("response_format.json_schema.name", "must be a string")
    if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
        raise invalid("response_format.json_schema.strict", f"must be true or false (got {spec.get('strict')!r})")
    schema = spec.get("schema")
    if schema is None:
        raise invalid("response_format.json_schema.schema", "a JSON Schema is required", code="missing_value")
    try:
        check_schema(schema, "response_format.json_schema.schema", what="json_schema")
    except UsageError as exc:
        raise ApiError(422, exc.message, param="response_format", code="unsupported_schema") from exc
    return schema


def _number_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def _sampler_value(flag: Any, value: Any) -> Any:
    if not _number_type(value, flag.types):
        kind = "an integer" if flag.types == (int,) else "a number"
        raise invalid(flag.key, f"must be {kind} (got {value!r})")
    problem = field_problem(flag.field, value)
    if problem:
        raise invalid(flag.key, problem)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"at most {MAX_STOP} stop sequences (got {len(stops)})")
    return tuple(stops)


# -- answers ----------------------------------------------------------------------------------------


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
    ``token_ids`` the generated ids; ``prompt_tokens``/``completion_tokens`` counts."""

    text: str
    thoughts: Optional[str]
    finish_reason: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int


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
        out.append(item)
    return {"id": id, "object": "chat.completion" if request.kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": out, "usage": usage(choices)}


def chunk(request: Request, model: str, *, id: str, created: int, index: int, content: Optional[str] = None,
          reasoning: Optional[str] = None, role: bool = False, finish_reason: Optional[str] = None,
          token_ids: Optional[list[int]] = None) -> dict[str, Any]:
    """One streamed chunk: a delta of the answer and/or the thoughts, or the finish."""
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
    return {"id": id, "object": kind, "created": created, "model": model, "choices": [item]}


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
