"""``diffgen edit``: marked spans (or line ranges) start from their old text, the rest is clamped."""

from __future__ import annotations

import subprocess

import pytest
import torch
from typer.testing import CliRunner

from diffgen.cli.app import app
from diffgen.denoise import loop
from diffgen.denoise.constrained.edit import (
    MIN_SLACK,
    Span,
    budget,
    edit,
    edit_layout,
    parse_lines,
    parse_marked,
    unified_diff,
)
from diffgen.denoise.options import Execution
from diffgen.errors import UsageError
from diffgen.prompt import encode

runner = CliRunner()

# Unicode, a span at the very start and at the very end, an empty span (an insertion point), and
# (at 16 positions a canvas on the tiny checkpoint) spans spread over several canvases.
DOCUMENTS = [
    "{{~Grüße~}} aus Zürich ☃,\nund 日本語 {{~ist schön~}}{{~~}} fin.\n{{~last words~}}",
    "# Notes\n\nThe quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n"
    "Answer: {{~forty two~}} end\n",
]


def _check_untouched(document_text, result):
    document = parse_marked(document_text)
    fixed = [i for i, on in enumerate(result.layout.fixed) if on]
    assert [result.token_ids[i] for i in fixed] == [result.layout.tokens[i] for i in fixed]
    # The output is the document's own text, byte for byte, around the spans' new texts.
    texts = iter(result.spans)
    assert result.text == "".join(next(texts).text if isinstance(p, Span) else p for p in document.pieces)
    assert result.original == document_text.replace("{{~", "").replace("~}}", "")
    for span in result.spans:
        assert span.end - span.start == budget(len(span.old_token_ids))


# -- documents ----------------------------------------------------------------------------------


def test_marked_spans_and_line_ranges_parse():
    assert parse_marked("a{{~b c~}}d{{~~}}").pieces == ("a", Span("b c"), "d", Span(""))
    text = "one\ntwo\nthree\nfour"
    assert parse_lines(text, ["2-3"]).pieces == ("one\n", Span("two\nthree"), "\nfour")
    assert parse_lines(text, ["4", "1"]).pieces == (Span("one"), "\ntwo\nthree\n", Span("four"))
    # The file is taken literally with --lines: a marker is just text.
    assert parse_lines("x {{~y\nz\n", ["1"]).pieces == (Span("x {{~y"), "\nz\n")
    assert budget(0) == MIN_SLACK and budget(4) == 4 + MIN_SLACK and budget(40) == 60


@pytest.mark.parametrize("text, words", [
    ("Dear {{~you", "unclosed {{~ at character 6"),
    ("a ~}} b", "~}} with no {{~ before it at character 3"),
    ("{{~a {{~b~}}", "{{~ inside a span at character 6"),
    ("Dear you", "marks no span"),
    ("", "marks no span"),
])
def test_bad_markers_are_refused(text, words):
    with pytest.raises(UsageError) as caught:
        parse_marked(text)
    assert words in str(caught.value)


@pytest.mark.parametrize("ranges, words", [
    (["x"], "is not N or A-B"), (["3-2"], "is empty"), (["0"], "before line 1"),
    (["2-5"], "past the end of the file (3 lines)"), (["1-2", "2"], "overlap at line 2"),
])
def test_bad_line_ranges_are_refused(ranges, words):
    with pytest.raises(UsageError) as caught:
        parse_lines("a\nb\nc\n", ranges)
    assert words in str(caught.value)


def test_the_diff_is_a_unified_diff_that_patch_applies(tmp_path):
    before, after = "a\nb\nc", "a\nB and more\nc\nd\n"
    diff = unified_diff(before, after, "f.txt")
    assert diff.startswith("--- a/f.txt\n+++ b/f.txt\n@@ ")
    assert "\\ No newline at end of file\n" in diff
    (tmp_path / "f.txt").write_text(before)
    subprocess.run(["patch", "-p1", "-s"], input=diff.encode(), cwd=tmp_path, check=True)
    assert (tmp_path / "f.txt").read_text() == after
    assert unified_diff(before, before, "f.txt") == ""


# -- the library --------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("document", DOCUMENTS, ids=["unicode-edges", "long"])
def test_unmarked_text_comes_back_byte_identical_for_many_seeds(tiny, document, exact):
    prefix = encode(tiny.tokenizer, "Make it formal")
    for seed in range(6):
        result = edit(tiny, prefix, document, tiny.defaults.replace(seed=seed, max_denoising_steps=4),
                      execution=Execution(exact=exact))
        _check_untouched(document, result)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_the_spans_start_from_their_old_tokens_not_noise(tiny, monkeypatch, exact):
    document = "Keep this. {{~Revise these few words~}} Keep that."
    canvas = int(tiny.model.config.canvas_length)
    plan, init, olds = edit_layout(parse_marked(document), tiny.tokenizer, canvas, tiny.defaults.pad_token_id)
    (start, end), (old,) = plan.spans[0], olds
    assert len(old) > 1 and init[start:end] == old + (tiny.defaults.pad_token_id,) * (end - start - len(old))
    first: dict[int, torch.Tensor] = {}
    from diffgen.denoise import runner

    real_step = runner.denoise_step

    def spy(state, context):
        first.setdefault(int(context.canvas_index[0]), state.canvas[0].clone())
        return real_step(state, context)

    monkeypatch.setattr(runner, "denoise_step", spy)
    result = edit(tiny, encode(tiny.tokenizer, "Shorter"), document,
                  tiny.defaults.replace(seed=3, max_denoising_steps=3), execution=Execution(exact=exact))
    # The span covers canvases 0 and 1; canvas 2 is fixed text only and takes no decoder pass.
    assert sorted(first) == [0, 1] and len(plan.tokens) == 3 * canvas
    start_canvas = torch.cat([first[0], first[1]]).tolist()
    # Every position the first pass reads is its clamped token, or the span's old text / pad.
    assert start_canvas == [t if i is None else i for t, i in zip(plan.tokens, init)][:2 * canvas]
    assert result.spans[0].old_token_ids == old


def test_without_init_the_loop_is_unchanged_and_init_changes_only_the_start(tiny):
    prompt = encode(tiny.tokenizer, "Hi")
    settings = tiny.defaults.replace(seed=4, max_denoising_steps=3, max_new_tokens=16)
    plain = loop.generate(tiny, [prompt], settings).completions[0].token_ids
    nothing = (torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.bool))
    generation = loop.stream(tiny, [prompt], settings, observe=False, constraints=loop.Constraints(init=nothing))
    list(generation)
    assert generation.result.completions[0].token_ids == plain
    with pytest.raises(UsageError, match="init tensors must be"):
        loop.stream(tiny, [prompt], settings, constraints=loop.Constraints(
            init=(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.bool))))


# -- the command line ---------------------------------------------------------------------------


def test_stdout_is_the_revised_file_as_the_library_revises_it(tiny, tiny_checkpoint, tmp_path):
    document = "Title\n\nThe {{~quick brown~}} fox ☃.\nEnd {{~of it~}}\n"
    path = tmp_path / "notes.md"
    path.write_text(document, encoding="utf-8")
    args = ["edit", "-m", str(tiny_checkpoint), "--seed", "9", "--steps", "4", str(path), "Make it formal"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    expected = edit(tiny, encode(tiny.tokenizer, "Make it formal"), document,
                    tiny.defaults.replace(seed=9, max_denoising_steps=4))
    assert result.stdout == expected.text
    # --diff: a unified diff of the file without markers against the revision, which patch applies.
    shown = runner.invoke(app, args + ["--diff"])
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout == unified_diff(expected.original, expected.text, "notes.md")
    if expected.text != expected.original:
        assert shown.stdout.startswith("--- a/notes.md\n+++ b/notes.md\n@@ ")
    work = tmp_path / "a"
    work.mkdir()
    (work / "notes.md").write_text(expected.original, encoding="utf-8")
    subprocess.run(["patch", "-p1", "-s"], input=shown.stdout.encode(), cwd=work, check=True)
    assert (work / "notes.md").read_text(encoding="utf-8") == result.stdout


def test_line_ranges_revise_those_lines_and_keep_the_rest(tiny, tiny_checkpoint, tmp_path):
    lines = ["line one {{~ kept literally", "line two", "line three", "line four", "line five"]
    path = tmp_path / "f.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for seed in range(3):
        result = runner.invoke(app, ["edit", "-m", str(tiny_checkpoint), "--seed", str(seed), "--steps", "3",
                                     "--lines", "2-3", "-l", "5", str(path), "Shout"])
        assert result.exit_code == 0, result.stderr
        expected = edit(tiny, encode(tiny.tokenizer, "Shout"), parse_lines(path.read_text(), ["2-3", "5"]),
                        tiny.defaults.replace(seed=seed, max_denoising_steps=3))
        assert result.stdout == expected.text
        assert result.stdout.startswith(lines[0] + "\n") and result.stdout.endswith("\n")
        assert "\nline four\n" in result.stdout


@pytest.mark.parametrize("content, extra, words", [
    ("Dear {{~you", [], "unclosed {{~"),
    ("Dear you", [], "marks no span"),
    (None, [], "cannot read"),
    ("a\nb\n", ["--lines", "7"], "past the end of the file"),
], ids=["unclosed", "no-span", "missing-file", "bad-lines"])
def test_bad_input_gives_one_line_and_exit_2_before_any_weights_are_read(tmp_path, content, extra, words):
    path = tmp_path / "doc.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    # The model does not exist: the file is refused before the checkpoint is even looked for.
    result = runner.invoke(app, ["edit", "-m", str(tmp_path / "missing"), *extra, str(path), "Fix it"])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffgen: error: ") and words in lines[0]
    assert result.stdout == ""
