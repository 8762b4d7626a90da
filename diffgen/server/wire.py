"""The OpenAI wire format, the requests' side: request bodies in, checked, as a :class:`Request`.

Plain dicts and frozen dataclasses, no web framework: :mod:`diffgen.server.app` calls these, and
tests call them directly (the answers' side: :mod:`diffgen.server.answers`; the bodies as JSON
Schema for the OpenAPI document: :mod:`diffgen.server.openapi`). Every refusal is an :class:`ApiError`, which the app turns into an
OpenAI-style error object ``{"error": {"message", "type", "param", "code"}}`` with its status.

Sampler settings come as extra body fields under the same names as a batch record or the config
file (:data:`diffgen.settings.SAMPLER_FLAGS`' keys: ``steps``, ``entropy_bound``, ``t_min``,
``t_max``, ``stability``, ``confidence``) and go through the same checks as the CLI's flags
(:func:`diffgen.settings.field_problem`). OpenAI's own ``max_tokens`` (or
``max_completion_tokens``), ``stop``, ``seed``, ``n`` and ``stream`` behave as its clients expect;
``temperature``/``top_p`` and the other fields of :data:`IGNORED_FIELDS` have no effect on this
sampler (as most OpenAI-compatible servers do, they are accepted; their types are still checked, and
``/v1/models`` lists them), while fields whose meaning cannot be honoured (``logprobs``,
``tools``) are refused rather than silently dropped.

``response_format``: ``{"type": "text"}`` (or none) is plain text; ``{"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}`` answers with JSON valid by construction for the
schema (:mod:`diffgen.denoise.constrained.schema`, the machinery of ``run --schema``, whatever ``strict``
says); a schema outside that subset is a 422 naming what it uses. ``{"type": "json_object"}``
is refused (422): with no schema there is no skeleton to lay out, and ``{"type": "object"}``
alone would only ever answer ``{}``. The schema fixes the answer's length, so ``max_tokens`` is
not applied to it, and ``stop`` and thinking mode are refused with it (either would break the JSON).

Images: chat messages may hold ``image_url`` parts (``{"type": "image_url", "image_url": {"url":
...}}``) beside text parts, in any order; the chat template places each where it stands. A message
with images keeps its content as a list of ``{"type": "text", "text"}`` and ``{"type": "image",
"url"}`` parts (a text-only message is one string, as before). The URL is a ``data:image/...;base64,``
URL, a local file (``file://`` or an absolute path; only when the server was started with
``--allow-local-images``) or ``http(s)://`` (only with ``--allow-remote-images``); the server's
:class:`~diffgen.server.app.Engine` reads them, this module only checks their form.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, replace
from typing import Any, Optional

from diffgen.settings import SAMPLER_FLAGS, SEED_LIMIT, field_problem

# ``steps`` a request may ask for unless ``serve --max-steps`` says otherwise. A canvas costs one
# decoder pass per step, and the loop keeps an n_steps-sized schedule, so an unbounded value would
# hold the model (and every request queued behind it) for as long as the client likes. The released
# checkpoint's default is 48 and the sampler's adaptive stop rarely lets more than that matter;
# 256 leaves room to experiment (over 5x the default) while keeping one canvas to minutes, not hours.
DEFAULT_MAX_STEPS = 256
MAX_CHOICES = 8  # ``n`` at most: each choice is one more row of a batch (or, run alone, one more generation)
MAX_STOP = 4  # OpenAI's own limit on stop sequences
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
IMAGE_SCHEMES = ("data:", "file://", "http://", "https://", "/")


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
        images: the ``image_url`` URLs of every message, in order, each with the body field it
            came from (``messages[1].content[0]``); empty for text-only requests.
        stream_steps: extension: stream every denoising step as a ``diffgen_step`` chunk (and
            each committed canvas as a ``diffgen_canvas`` chunk), so a remote client can draw the
            live view or write a trace; only with ``stream``.
    """

    kind: str
    model: Optional[str]
    messages: tuple[dict[str, Any], ...]
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
    images: tuple[tuple[str, str], ...] = ()
    stream_steps: bool = False

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
    request = _common(body, "chat", messages=turns, prompt=None, think=think)
    images = tuple((part["url"], f"messages[{index}].content[{number}]") for index, turn in enumerate(turns)
                   if isinstance(turn["content"], list)
                   for number, part in enumerate(turn["content"]) if part["type"] == "image")
    if images and request.schema is not None:
        raise invalid(None, "response_format json_schema does not combine with images yet", param="response_format",
                      code="unsupported")
    return replace(request, images=images) if images else request


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


#: How deep a request body's arrays and objects may nest (a real request needs about 6).
MAX_DEPTH = 64


def parse_body(data: bytes) -> Any:
    """A request body's JSON, or a 400 naming what is wrong with it: not UTF-8, not JSON (``NaN``
    and ``Infinity`` are not JSON either), nested deeper than :data:`MAX_DEPTH`, or holding a
    string that is not text (a lone surrogate such as ``"\\ud800"``, which no tokenizer takes)."""

    def no_constant(word: str) -> Any:
        raise ValueError(f"{word} is not a JSON value")

    try:
        body = json.loads(data, parse_constant=no_constant)
    except RecursionError as exc:
        raise ApiError(400, f"the body nests deeper than {MAX_DEPTH} levels", code="invalid_json") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of 5,000 digits
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    _check_tree(body)
    return body


def _check_tree(body: Any) -> None:
    """Depth and text of every value, without recursion (see :func:`parse_body`)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
        if isinstance(value, dict):
            for key, child in value.items():
                _check_text(key, f"{where}.{_shown(key)}" if where else _shown(key))
                stack.append((child, f"{where}.{_shown(key)}" if where else _shown(key), depth + 1))
        elif isinstance(value, list):
            stack += [(child, f"{where}[{i}]", depth + 1) for i, child in enumerate(value)]
        elif isinstance(value, str):
            _check_text(value, where or "the body")


def _shown(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:40]


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{where}: a lone surrogate (\\u{ord(text[exc.start]):04x} at character {exc.start}) is "
                            "not text; send valid UTF-16 pairs or UTF-8", param=where or None,
                       code="invalid_json") from None


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(where, "must be an object with role and content")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:  # a list or object is unhashable: no dict lookup
        raise invalid(f"{where}.role", f"must be one of {', '.join(ROLES)} (got {role!r})")
    content = message.get("content")
    if isinstance(content, list):
        parts: list[dict[str, str]] = []
        for number, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                if ROLES[role] != "user":
                    raise invalid(f"{where}.content[{number}]", "images go in user messages")
                parts.append({"type": "image", "url": _image_url(f"{where}.content[{number}]", part)})
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise invalid(f"{where}.content[{number}]", "only text parts ({type: text, text}) and image parts "
                                                           "({type: image_url, image_url: {url}}) are supported")
        if any(part["type"] == "image" for part in parts):
            return {"role": ROLES[role], "content": parts}
        content = "\n".join(part["text"] for part in parts)
    if not isinstance(content, str):
        raise invalid(f"{where}.content", "must be a string or a list of text parts")
    return {"role": ROLES[role], "content": content}


def _image_url(where: str, part: dict[str, Any]) -> str:
    """The URL of an ``image_url`` part (the object form, or a bare string as some clients send)."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise invalid(None, f"{where}.image_url: must be an object with a url", code="missing_value", param=where)
    if not url.startswith(IMAGE_SCHEMES):
        raise invalid(None, f"{where}.image_url: the url must be a data: URL (data:image/png;base64,...), a local "
                            "file (file:// or an absolute path) or an http(s) URL", param=where)
    return url


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


def _common(body: dict[str, Any], kind: str, *, messages: tuple[dict[str, Any], ...], prompt: Optional[str],
            think: bool) -> Request:
    """The fields both endpoints read, checked, and the request they make."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "must be a string")
    _refuse_unsupported(body)
    flags, seed = _flags(body), _seed(body)
    n = _int(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise invalid("n", f"must be from 1 to {MAX_CHOICES} (got {n})")
    stop = _stop(body.get("stop"))
    stream, include_usage = _stream(body)
    schema = _response_format(body.get("response_format"))
    stream_steps = _bool(body, "stream_steps", False)
    if stream_steps and not stream:
        raise invalid("stream_steps", "needs stream: true (the steps are sent as server-sent events)")
    if schema is not None:
        _schema_alone(stream_steps, think, stop)
    return Request(kind=kind, model=model, messages=messages, prompt=prompt, think=think, flags=flags, seed=seed,
                   n=n, stop=stop, stream=stream, include_usage=include_usage,
                   return_token_ids=_bool(body, "return_token_ids", False), schema=schema,
                   stream_steps=stream_steps)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Fields whose meaning cannot be honoured are refused; ignored ones have their types checked."""
    for key in ("logprobs", "echo"):
        if body.get(key) not in (None, False, 0):
            raise invalid(key, "is not supported by diffgen's sampler", code="unsupported")
    if body.get("tools"):
        raise invalid("tools", "tool calling is not supported", code="unsupported")
    for key, (types, shown) in IGNORED_FIELDS.items():
        value = body.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise invalid(key, f"must be {shown} (got {value!r}); it has no effect on diffgen's sampler")


def _flags(body: dict[str, Any]) -> dict[str, Any]:
    """The generation settings the body gives, by field name (``max_tokens`` as ``max_new_tokens``)."""
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
    return flags


def _seed(body: dict[str, Any]) -> int:
    """The first choice's seed: the body's, checked, or one drawn at random."""
    seed = body.get("seed")
    if seed is None:
        return secrets.randbelow(2**31)
    problem = field_problem("seed", seed) if _number_type(seed, (int,)) else f"must be an integer (got {seed!r})"
    if problem:
        raise invalid("seed", problem)
    return seed


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options", "must be an object")
        include_usage = _bool(options, "include_usage", False, name="stream_options.include_usage")
    return stream, include_usage


def _schema_alone(stream_steps: bool, think: bool, stop: tuple[str, ...]) -> None:
    """What a json_schema request may not combine with."""
    if stream_steps:
        raise invalid("stream_steps", "does not combine with response_format json_schema yet; drop one of them")
    if think:
        raise invalid(None, "response_format json_schema does not combine with thinking mode yet; "
                            "drop think / chat_template_kwargs.enable_thinking", param="response_format")
    if stop:
        raise invalid("stop", "does not combine with response_format json_schema (a stop string would cut "
                              "the JSON); drop stop")


def _response_format(value: Any) -> Optional[dict[str, Any]]:
    """``response_format``'s schema: ``None`` for text, the checked schema for ``json_schema``."""
    from diffgen.denoise.constrained.schema import check_schema
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


#: OpenAI fields this server accepts but that have no effect on its sampler (field -> accepted
#: types, as said in a refusal): their types are checked, so that a client's mistake is heard.
IGNORED_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "frequency_penalty": ((int, float), "a number"),
    "presence_penalty": ((int, float), "a number"),
    "logit_bias": ((dict,), "an object"),
    "user": ((str,), "a string"),
    "parallel_tool_calls": ((bool,), "true or false"),
}
