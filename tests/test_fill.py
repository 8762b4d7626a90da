"""``diffgen fill``: templates parsed, fixed tokens clamped at every step, holes filled (library and CLI)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffgen.cli.app import app
from diffgen.denoise.constrained.fill import DEFAULT_HOLE, Hole, fill, layout, parse_template
from diffgen.denoise.loop import Constraints, Execution, StepEvent, stream
from diffgen.errors import UsageError

runner = CliRunner()

# Unicode, a hole at the very start and at the very end, two adjacent holes, and (at 16 positions
# a canvas on the tiny checkpoint) several canvases with holes split across canvas boundaries.
TEMPLATES = [
    "{{3}}Grüße aus Zürich ☃, {{5}}{{2}} und 日本語 {{}}",
    "Dear {{4}}, thanks for the {{}} — see you soon. {{1}}",
]
# More fixed text than one canvas before the first hole: canvas 0 holds no hole.
LONG_PREFIX = ("The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 2
               + "Answer: {{6}} end")


def _prefix(loaded):
    return list(loaded.tokenizer("", add_special_tokens=True)["input_ids"])


def _check_clamped(loaded, template_text, result):
    plan = result.layout
    fixed = [i for i, on in enumerate(plan.fixed) if on]
    assert [result.token_ids[i] for i in fixed] == [plan.tokens[i] for i in fixed]
    template = parse_template(template_text)
    # Hole lengths: each hole owns exactly its N positions and its text never uses more.
    assert [hole.end - hole.start for hole in result.holes] == [h.length for h in template.holes]
    assert all(len(hole.token_ids) == hole.end - hole.start for hole in result.holes)
    # The output is the template's own fixed text, byte for byte, around the holes' texts.
    texts = iter(result.holes)
    expected = "".join(next(texts).text if isinstance(p, Hole) else p for p in template.pieces)
    assert result.text == expected
    for piece in template.pieces:
        if isinstance(piece, str):
            assert piece in result.text


# -- templates ----------------------------------------------------------------------------------


def test_templates_parse_into_fixed_text_and_holes():
    assert parse_template("a{{}}b{{ 7 }}}}c{{1}}").pieces == ("a", Hole(DEFAULT_HOLE), "b", Hole(7), "}}c", Hole(1))
    assert parse_template("{{2}}{{3}}").pieces == (Hole(2), Hole(3))


@pytest.mark.parametrize("text, words", [
    ("Dear {{4, hello", "unclosed {{ at character 6"),
    ("Dear {{four}}", "{{four}} at character 6 is not a number"),
    ("Dear {{-3}}", "is not a number"),
    ("Dear {{0}}", "must hold 1 to"),
    ("Dear you", "no hole"),
    ("", "no hole"),
])
def test_malformed_templates_are_refused(text, words):
    with pytest.raises(UsageError) as caught:
        parse_template(text)
    assert words in str(caught.value)


# -- the library --------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("template", TEMPLATES + [LONG_PREFIX], ids=["unicode-edges", "letter", "long"])
def test_every_clamped_token_comes_back_for_many_seeds(tiny, template, exact):
    for seed in range(6):
        result = fill(tiny, _prefix(tiny), template, tiny.defaults.replace(seed=seed, max_denoising_steps=4),
                      execution=Execution(exact=exact))
        _check_clamped(tiny, template, result)


def test_holes_split_across_canvases_and_fixed_canvases_take_no_decoder_pass(tiny):
    canvas = int(tiny.model.config.canvas_length)
    result = fill(tiny, _prefix(tiny), LONG_PREFIX, tiny.defaults.replace(seed=1, max_denoising_steps=3))
    assert len(result.token_ids) == len(result.steps_per_canvas) * canvas > canvas
    (hole,) = result.holes
    first_hole_canvas = hole.start // canvas
    assert first_hole_canvas >= 1 and set(result.steps_per_canvas[:first_hole_canvas]) == {0}
    assert result.steps_per_canvas[hole.start // canvas] > 0
    # A template whose holes straddle a canvas boundary: the 16-token hole cannot fit in one canvas.
    result = fill(tiny, _prefix(tiny), "ab {{}} cd {{}}", tiny.defaults.replace(seed=2, max_denoising_steps=3))
    assert len(result.steps_per_canvas) >= 2 and all(steps > 0 for steps in result.steps_per_canvas)
    _check_clamped(tiny, "ab {{}} cd {{}}", result)


def test_clamped_positions_have_zero_entropy_are_always_accepted_and_never_change(sharp):
    plan = layout(parse_template("x {{5}} yz {{3}}"), sharp.tokenizer, int(sharp.model.config.canvas_length),
                  sharp.defaults.pad_token_id)
    tokens = torch.tensor([plan.tokens, plan.tokens])
    mask = torch.tensor([plan.fixed, plan.fixed])
    settings = sharp.defaults.replace(seed=5, max_denoising_steps=6, max_new_tokens=len(plan.tokens))
    for exact in (True, False):
        events = [e for e in stream(sharp, [_prefix(sharp), _prefix(sharp) + [7]], settings,
                                    execution=Execution(exact=exact), constraints=Constraints(clamp=(tokens, mask)))
                  if isinstance(e, StepEvent)]
        assert events
        for event in events:
            assert torch.equal(event.token_entropy[mask], torch.zeros(int(mask.sum())))
            assert bool(event.accepted[mask].all())
            assert torch.equal(event.canvas_tokens[mask], tokens[mask])
            assert torch.equal(event.draft[mask], tokens[mask])
            # the free positions are really denoised (a random model is far from certain)
            assert bool((event.token_entropy[~mask] > 0).all())


def test_replayed_graph_steps_clamp_like_eager_steps(tiny, eager_graphs):
    plan = layout(parse_template("{{4}} mid {{6}}"), tiny.tokenizer, int(tiny.model.config.canvas_length),
                  tiny.defaults.pad_token_id)
    clamp = (torch.tensor([plan.tokens]), torch.tensor([plan.fixed]))
    settings = tiny.defaults.replace(seed=3, max_denoising_steps=5, max_new_tokens=len(plan.tokens))
    runs = []
    for graphs in (False, True):
        generation = stream(tiny, [_prefix(tiny)], settings, execution=Execution(exact=False, graphs=graphs),
                            constraints=Constraints(clamp=clamp))
        runs.append([e.canvas_tokens.clone() for e in generation if isinstance(e, StepEvent)])
    assert len(runs[0]) == len(runs[1]) and all(torch.equal(a, b) for a, b in zip(*runs))
    assert all(torch.equal(c[clamp[1]], clamp[0][clamp[1]]) for c in runs[1])


def test_clamp_tensors_must_cover_whole_canvases(tiny):
    with pytest.raises(UsageError, match="whole canvases"):
        stream(tiny, [_prefix(tiny)], tiny.defaults.replace(max_new_tokens=16), constraints=Constraints(
            clamp=(torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, 10, dtype=torch.bool))))


# -- the command line ---------------------------------------------------------------------------


def test_stdout_is_the_filled_template_as_the_library_fills_it(tiny, tiny_checkpoint):
    template = "{{2}}Grüße ☃ {{3}}{{2}} fin {{4}}"
    result = runner.invoke(app, ["fill", "-m", str(tiny_checkpoint), "--seed", "9", "--steps", "4", template])
    assert result.exit_code == 0, result.stderr
    expected = fill(tiny, _prefix(tiny), template, tiny.defaults.replace(seed=9, max_denoising_steps=4))
    assert result.stdout == expected.text + "\n"
    # and from stdin
    piped = runner.invoke(app, ["fill", "-m", str(tiny_checkpoint), "--seed", "9", "--steps", "4", "-"],
                          input=template + "\n")
    assert piped.exit_code == 0, piped.stderr
    assert piped.stdout == result.stdout


def test_json_reports_each_holes_text_span_and_confidence(tiny, tiny_checkpoint):
    from diffgen.prompt import encode

    template = "Dear {{4}}, thanks for {{}}."
    result = runner.invoke(app, ["fill", "-m", str(tiny_checkpoint), "--seed", "2", "--steps", "3", "--json",
                                 "-p", "Write a polite note", template])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert [(h["end"] - h["start"]) for h in record["holes"]] == [4, DEFAULT_HOLE]
    assert all(len(h["tokens"]) == h["end"] - h["start"] and h["mean_entropy"] >= 0 for h in record["holes"])
    assert record["text"] == f"Dear {record['holes'][0]['text']}, thanks for {record['holes'][1]['text']}."
    assert record["seed"] == 2 and record["prompt_tokens"] == len(encode(tiny.tokenizer, "Write a polite note"))


@pytest.mark.parametrize("template", ["Dear {{4", "Dear {{n}}", "Dear you"], ids=["unclosed", "nan", "no-hole"])
def test_bad_templates_give_one_line_and_exit_2_before_any_weights_are_read(tmp_path, template):
    # The model does not exist: the template is refused before the checkpoint is even looked for.
    result = runner.invoke(app, ["fill", "-m", str(tmp_path / "missing"), template])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffgen: error: the ")
    assert "template" in lines[0] or "hole" in lines[0]
    assert result.stdout == ""


def test_a_template_longer_than_the_context_is_refused_before_the_weights_load(tiny_checkpoint):
    # The tiny checkpoint's context is 4096 positions: two 4096-token holes cannot fit.
    result = runner.invoke(app, ["fill", "-m", str(tiny_checkpoint), "{{4096}} and {{4096}}"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("diffgen: error: the prompt (1 tokens) plus the template (")
    assert "shorten the template" in lines[-1] and "plan:" not in result.stderr
