"""The API fuzzed from its own OpenAPI document (schemathesis, in process over ASGI, the tiny model
generating for real): whatever the body, no 5xx, and every refusal is an OpenAI error object.

Both generation modes run: bodies the schema allows (which the server must answer or refuse
with a 4xx: a few, t_min above t_max for one, are refused by checks a schema cannot state) and
bodies it does not (wrong types, out-of-range values, missing fields). Examples are bounded and
derandomized (the same bodies every run), and the fields that set the work — steps, max_tokens,
n — are capped after generation (and the served defaults made as small) so that a valid body
costs milliseconds on the tiny model; their ranges are fuzzed through the negative mode and the
wire tests.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from diffgen.server import openapi, wire
from diffgen.server.app import Engine, create_app
from diffgen.settings import FIELD_SCHEMAS, field_problem

EXAMPLES = 50  # per endpoint and mode: 4 x 50 bodies, about 10 s on the 2-core CI machine
CAPS = {"steps": 2, "max_tokens": 24, "max_completion_tokens": 24, "max_new_tokens": 24, "n": 2}


@pytest.fixture(scope="module")
def api_schema(tiny):
    # A body that sets no steps or max_tokens gets these cheap defaults instead of the checkpoint's 48 and 256.
    defaults = tiny.defaults.replace(max_denoising_steps=CAPS["steps"], max_new_tokens=CAPS["max_tokens"])
    app = create_app(Engine(loaded=tiny, name="tiny", settings=defaults, exact=True), max_body=64 * 1024)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def capped(body):
    """The body with its cost fields capped where they hold valid numbers (anything else is left to fail)."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    for key, cap in CAPS.items():
        value = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            out[key] = cap
    return out


def check_answer(response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    elif "text/event-stream" in " ".join(response.headers.get("content-type", [])):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert not any("error" in json.loads(event) for event in events[:-1]), response.text[:500]
    else:
        assert response.json()["choices"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_body_gets_a_5xx_and_every_refusal_is_an_error_object(api_schema, path, mode):
    operation = api_schema[path]["POST"]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        case.body = capped(case.body)
        check_answer(case.call())

    fuzz()


def test_the_documented_bodies_are_the_field_tables(api_schema):
    document = api_schema.raw_schema
    for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "text")):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == json.loads(json.dumps(openapi.body_schema(kind)))
        assert {"steps", "entropy_bound", "t_min", "t_max", "stability", "confidence", "stream_steps"} <= set(
            body["properties"])


@pytest.mark.parametrize("field", sorted(FIELD_SCHEMAS))
def test_the_published_ranges_are_the_checks_at_their_bounds(field):
    schema = FIELD_SCHEMAS[field]
    if "minimum" in schema:
        assert field_problem(field, schema["minimum"]) is None
        assert field_problem(field, schema["minimum"] - (1 if schema["type"] == "integer" else 1e-9)) is not None
    else:
        assert field_problem(field, schema["exclusiveMinimum"]) is not None
        assert field_problem(field, schema["exclusiveMinimum"] + 1e-9) is None
    if "maximum" in schema:
        assert field_problem(field, schema["maximum"]) is None and field_problem(field, schema["maximum"] + 1)
    if schema["type"] == "integer":
        assert field_problem(field, 2.5) is not None
