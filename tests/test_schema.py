"""``--schema``: JSON valid by construction on tiny random checkpoints (library and CLI)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from typer.testing import CliRunner

from diffgen.cli.app import app
from diffgen.denoise.constrained.schema import RETRY_ENTROPY, generate_json, load_schema, skeleton, vocabulary
from diffgen.denoise.options import Execution
from diffgen.errors import UsageError

runner = CliRunner()

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "städte": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 2},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "delta": {"type": "integer"},
        "height": {"type": "number", "minimum": -2.5, "maximum": 3},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "nothing": {"type": "null"},
        "colour": {"type": "string", "enum": ["red", "green", "blue violet"]},
        "level": {"enum": [1, 2.5, "hi", None, False]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "integer", "minimum": 1000,
                                                                   "maximum": 99999}},
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "points": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": -5,
                                                                           "maximum": 5}, "maxItems": 2},
                   "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "städte", "age", "delta", "height", "score", "active", "nothing", "colour", "level",
                 "address", "points"],
    "additionalProperties": False,
}
SCALARS = [{"type": "string"}, {"type": "integer", "minimum": 3, "maximum": 4}, {"type": "number"},
           {"type": "boolean"}, {"type": "null"}, {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}]


def _prefix(loaded):
    return list(loaded.tokenizer("", add_special_tokens=True)["input_ids"])


@pytest.fixture(scope="module")
def vocab(tiny):
    return vocabulary(tiny.tokenizer, int(tiny.model.config.text_config.vocab_size), tiny.defaults.pad_token_id)


# -- the schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("schema, words", [
    ({"anyOf": [{"type": "string"}]}, "anyOf at /"),
    ({"type": "object", "properties": {"a": {"$ref": "#/x"}}, "required": ["a"]}, "$ref at /a"),
    ({"type": "string", "pattern": "a+"}, "pattern at /"),
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a"]},
     "optional properties (b) at /"),
    ({"type": "object", "properties": {}, "additionalProperties": True}, "additionalProperties other than false"),
    ({"type": "array", "items": {"type": "string"}}, "an array without maxItems"),
    ({"type": ["string", "null"]}, "a type list at /"),
    ({"type": "string", "minLength": 2, "format": "email"}, "format, minLength at /"),
    ({"type": "strin"}, "not a valid JSON Schema"),
])
def test_unsupported_schemas_are_refused_with_one_line(schema, words):
    with pytest.raises(UsageError) as caught:
        load_schema(json.dumps(schema))
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_skeleton_is_the_keys_and_punctuation():
    pieces = skeleton({"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "string"}},
                       "required": ["a", "b"]})
    assert pieces[0] == '{"a": null, "b": "'
    assert pieces[1].kind == "string" and pieces[2] == '"}'


# -- the library --------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_the_output_validates_for_many_seeds(tiny, vocab, exact):
    for seed in range(8):
        result = generate_json(tiny, _prefix(tiny), PERSON, tiny.defaults.replace(seed=seed, max_denoising_steps=3),
                               execution=Execution(exact=exact), vocab=vocab)
        value = json.loads(result.text)
        jsonschema.validate(value, PERSON)
        assert value == result.value
        assert len(value["städte"]) == 2 and len(value["points"]) == 3
        # Every clamped position (the skeleton) came back as laid out.
        plan = result.layout
        assert all(result.token_ids[i] == plan.tokens[i] for i, on in enumerate(plan.fixed) if on)
        # Every slot position holds one of its allowed tokens (the restriction acted on the logits).
        for (start, end), slot in zip(plan.spans, result.slots):
            assert all(result.token_ids[i] in plan.allowed[i] for i in range(start, end)), slot.path
            assert slot.mean_entropy >= 0


@pytest.mark.parametrize("schema", SCALARS, ids=[s["type"] for s in SCALARS])
def test_every_root_type_validates(tiny, vocab, schema):
    for seed in range(4):
        result = generate_json(tiny, _prefix(tiny), schema, tiny.defaults.replace(seed=seed, max_denoising_steps=3),
                               vocab=vocab)
        jsonschema.validate(json.loads(result.text), schema)


def test_a_sharp_model_still_obeys_the_restriction(sharp):
    vocab = vocabulary(sharp.tokenizer, int(sharp.model.config.text_config.vocab_size), sharp.defaults.pad_token_id)
    for seed in range(4):
        result = generate_json(sharp, _prefix(sharp), PERSON, sharp.defaults.replace(seed=seed, max_denoising_steps=3),
                               execution=Execution(exact=False), vocab=vocab)
        jsonschema.validate(json.loads(result.text), PERSON)


def test_retries_resample_only_unsure_slots(tiny, vocab):
    settings = tiny.defaults.replace(seed=3, max_denoising_steps=3)
    once = generate_json(tiny, _prefix(tiny), PERSON, settings, vocab=vocab)
    twice = generate_json(tiny, _prefix(tiny), PERSON, settings, retries=2, vocab=vocab)
    jsonschema.validate(json.loads(twice.text), PERSON)
    # A random model is unsure about free text: those slots were resampled and none got worse; a
    # sure slot (a choice between two tokens sits under RETRY_ENTROPY) kept its tokens.
    resampled = 0
    for a, b in zip(once.slots, twice.slots):
        if a.mean_entropy > RETRY_ENTROPY:
            assert b.attempts >= 2 and b.mean_entropy <= a.mean_entropy + 1e-6
            resampled += 1
        else:
            assert b.attempts == 1 and b.token_ids == a.token_ids
    assert resampled >= 5
    assert len(twice.steps_per_canvas) == 3 and twice.forwards > once.forwards


# -- the CLI ------------------------------------------------------------------------------------


def test_run_schema_prints_valid_json(tiny_checkpoint, tmp_path):
    path = tmp_path / "person.json"
    path.write_text(json.dumps(PERSON), encoding="utf-8")
    result = runner.invoke(app, ["run", "--model", str(tiny_checkpoint), "--schema", str(path), "--seed", "1",
                                 "--steps", "3", "--no-stdin", "-q", "A person"])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), PERSON)
    result = runner.invoke(app, ["run", "--model", str(tiny_checkpoint), "--schema", str(path), "--seed", "1",
                                 "--steps", "3", "--no-stdin", "-q", "--json", "A person"])
    record = json.loads(result.stdout)
    jsonschema.validate(json.loads(record["text"]), PERSON)
    assert {slot["path"] for slot in record["slots"]} >= {"/name", "/age", "/address/zip", "/points/2/1"}
    assert all(slot["mean_entropy"] > 0 for slot in record["slots"])


def test_an_unsupported_schema_is_refused_before_the_weights(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}},
                                "required": ["a"]}), encoding="utf-8")
    # The model does not exist: a refusal that names the schema proves nothing was loaded first.
    result = runner.invoke(app, ["run", "--model", str(tmp_path / "missing"), "--schema", str(path), "--no-stdin",
                                 "hi"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "anyOf at /a" in lines[0] and "does not support" in lines[0]


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_an_all_allowed_mask_changes_no_token(tiny, exact):
    import torch

    from diffgen.denoise.loop import Constraints, stream

    settings = tiny.defaults.replace(seed=5, max_new_tokens=32, max_denoising_steps=4)
    vocab_size = int(tiny.model.config.text_config.vocab_size)

    def tokens(allowed):
        generation = stream(tiny, [_prefix(tiny)], settings, observe=False, execution=Execution(exact=exact),
                            constraints=Constraints(allowed=allowed))
        for _ in generation:
            pass
        return generation.result.completions[0].token_ids

    assert tokens(None) == tokens(torch.ones((1, 32, vocab_size), dtype=torch.bool))


def test_batch_schema_writes_valid_json_for_every_record(tiny_checkpoint, tmp_path):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Paris\nZürich\nA city on a river\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["batch", str(prompts), "--model", str(tiny_checkpoint), "--schema", str(path),
                                 "--steps", "3", "--batch-size", "2", "--retries", "1", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 3 and all("error" not in r for r in records)
    for record in records:
        jsonschema.validate(json.loads(record["text"]), schema)
        assert [slot["path"] for slot in record["slots"]] == ["/city", "/population"]
    assert json.loads((tmp_path / "out.jsonl.settings.json").read_text())["settings"]["schema"] == schema
