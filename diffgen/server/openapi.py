"""The OpenAPI document's parts that FastAPI cannot infer: the request bodies as JSON Schema (the
handlers read raw bodies, checked by :mod:`diffgen.server.wire`) and the error objects.

The body schema comes from field tables beside the parsers' limits, so the document cannot drift
from what the parsers accept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffgen.server.wire import DEFAULT_MAX_STEPS, MAX_CHOICES, MAX_STOP, ROLES
from diffgen.settings import FIELD_SCHEMAS, SAMPLER_FLAGS

if TYPE_CHECKING:
    from fastapi import FastAPI

_BOOL = {"type": "boolean"}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
# Body field -> its JSON Schema, for the fields both endpoints read (wire's parsers check each).
BODY_FIELDS: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "description": "The served model (GET /v1/models); default: that one."},
    "max_tokens": {**FIELD_SCHEMAS["max_new_tokens"], "description": "Most tokens to return."},
    "max_completion_tokens": {**FIELD_SCHEMAS["max_new_tokens"], "description": "Another name of max_tokens."},
    **{flag.key: {**FIELD_SCHEMAS[flag.field], "description": f"diffgen's sampler setting (the CLI's {flag.flag})."}
       for flag in SAMPLER_FLAGS},
    "seed": {**FIELD_SCHEMAS["seed"], "description": "Seed of choice 0; choice i uses seed + i. Default: random."},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES, "description": "Choices to generate."},
    "stop": {"description": "Strings that end the answer (not included).",
             "anyOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "minLength": 1}}]},
    "stream": {**_BOOL, "description": "Answer as server-sent events, one delta per committed canvas."},
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
    "stream_steps": {**_BOOL, "description": "diffgen extension, with stream: a diffgen_step chunk per "
                                             "denoising step and a diffgen_canvas chunk per committed canvas."},
    "return_token_ids": {**_BOOL, "description": "Each choice also carries its generated token_ids."},
    "response_format": {"type": "object", "description": "text, or json_schema (answers valid by construction "
                                                         "for a subset of JSON Schema).",
                        "properties": {"type": {"enum": ["text", "json_schema", "json_object"]},
                                       "json_schema": {"type": "object"}}},
    "temperature": {"type": "number", "description": "No effect: the sampler has its own schedule (t_min, t_max)."},
    "top_p": {"type": "number", "description": "No effect."},
    "frequency_penalty": {"type": "number", "description": "No effect."},
    "presence_penalty": {"type": "number", "description": "No effect."},
    "logit_bias": {"type": "object", "description": "No effect."},
    "user": {"type": "string", "description": "No effect."},
    "parallel_tool_calls": {**_BOOL, "description": "No effect."},
    "logprobs": {"description": "Not supported: only false or null."},
    "echo": {"description": "Not supported: only false or null."},
    "tools": {"description": "Not supported: only empty or null."},
}
CHAT_FIELDS: dict[str, dict[str, Any]] = {
    "messages": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": list(ROLES)},
                       "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}}},
    "think": {**_BOOL, "description": "Thinking mode (the thoughts come in reasoning_content)."},
    "chat_template_kwargs": {"type": "object", "properties": {"enable_thinking": _BOOL}},
}
TEXT_FIELDS: dict[str, dict[str, Any]] = {
    "prompt": {"description": "The prompt, sent as is (no chat template).",
               "anyOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}}]},
}


def body_schema(kind: str, max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, Any]:
    """The JSON Schema of a ``chat`` or ``text`` request body, from the field tables above (the
    OpenAPI document's ``requestBody``), with the server's bound (``max_steps``: ``serve
    --max-steps``) as the maximum of ``steps`` and ``stability``. Other fields are allowed and
    ignored, as OpenAI clients send some this server has no use for."""
    own = CHAT_FIELDS if kind == "chat" else TEXT_FIELDS
    bounded = {key: {**BODY_FIELDS[key], "maximum": max_steps} for key in ("steps", "stability")}
    return {"type": "object", "required": ["messages"] if kind == "chat" else ["prompt"],
            "properties": {**own, **BODY_FIELDS, **bounded}, "additionalProperties": True}



def request_body(kind: str, max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of an endpoint whose handler reads the raw body (the checks are
    :mod:`~diffgen.server.wire`'s, so FastAPI cannot infer it): the schema from the field tables,
    so the document cannot drift from them (``max_steps``: the server's bound on ``steps``)."""
    schema = body_schema(kind, max_steps=max_steps)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


ERROR_OBJECT = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "The answer (a JSON object), or with stream: true server-sent events.",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **{status: {"description": what, "content": {"application/json": {"schema": ERROR_OBJECT}}}
       for status, what in ((400, "Malformed JSON or a prompt over the context."),
                            (401, "A missing or wrong API key."), (404, "An unknown model."),
                            (413, "A body over the size limit."), (422, "A bad parameter."),
                            (429, "The queue is full; retry after Retry-After seconds."),
                            (500, "The generation failed (see the server's log)."))},
}


def install(app: FastAPI, max_steps: int) -> None:
    """Add the request bodies to ``app``'s generated document (rather than passing them as
    ``openapi_extra``, which FastAPI encodes as JSON numbers of its own: 2**63 - 1, the seed's
    maximum, became a float)."""
    generated = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generated()
            for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "text")):
                document["paths"][path]["post"].update(request_body(kind, max_steps))
        return app.openapi_schema

    app.openapi = openapi
