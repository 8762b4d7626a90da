"""``--show-steps``, ``--trace`` and ``replay`` for ``fill`` and ``edit``: clamped positions shown as fixed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from diffgen.cli.app import app
from diffgen.denoise.constrained.fill import layout, parse_template
from diffgen.records.trace import CanvasRecord, StepRecord, TraceWriter, read_trace
from diffgen.ui import picture, view

runner = CliRunner()
TEMPLATE = "Dear {{3}}, thanks for the {{5}}. Best, Ana and the whole team"


@pytest.fixture(scope="module")
def filled(tiny_checkpoint, tmp_path_factory):
    """One traced fill with --show-steps (stderr is not a terminal here: plain lines)."""
    path = tmp_path_factory.mktemp("fill") / "fill.jsonl"
    args = ["fill", "-m", str(tiny_checkpoint), "--seed", "4", "--steps", "3", TEMPLATE]
    result = runner.invoke(app, [*args, "--show-steps", "--trace", str(path)])
    assert result.exit_code == 0, result.stderr
    plain = runner.invoke(app, args)
    return path, result, plain


def test_fill_traces_mark_the_templates_text_fixed(filled, tiny):
    path, result, plain = filled
    assert result.stdout == plain.stdout  # watching changes nothing on stdout
    canvas = int(tiny.model.config.canvas_length)
    plan = layout(parse_template(TEMPLATE), tiny.tokenizer, canvas, tiny.defaults.pad_token_id)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["type"] == "header" and lines[-1] == {**lines[-1], "type": "result", "text": plain.stdout[:-1]}
    canvases = [line for line in lines if line["type"] == "canvas"]
    assert [f for c in canvases for f in c["fixed"]] == list(plan.fixed)
    for line in lines:
        if line["type"] == "step":
            window = plan.fixed[line["canvas"] * canvas:(line["canvas"] + 1) * canvas]
            assert line["fixed"] == list(window)
            # a fixed position always holds its token and is always accepted
            assert all(a for a, f in zip(line["accepted"], line["fixed"]) if f)


def test_fill_show_steps_lines_count_the_fixed_positions(filled):
    _, result, _ = filled
    lines = [line for line in result.stderr.splitlines() if line.startswith("canvas ")]
    assert lines and all(" fixed " in line for line in lines)
    assert lines[0].startswith("canvas 1/") and " step 1/3 accepted " in lines[0]


def test_replay_draws_what_the_fill_drew_and_the_picture_names_fixed_text(filled, tmp_path):
    path, result, _ = filled
    replayed = runner.invoke(app, ["replay", str(path), "--speed", "0"])
    assert replayed.exit_code == 0, replayed.stderr
    assert replayed.stdout == result.stdout
    assert ([line for line in replayed.stderr.splitlines() if line.startswith("canvas ")]
            == [line for line in result.stderr.splitlines() if line.startswith("canvas ")])
    svg = tmp_path / "fill.svg"
    assert runner.invoke(app, ["replay", str(path), "--svg", str(svg)]).exit_code == 0
    shown = "".join(svg.read_text(encoding="utf-8").replace("&#160;", " ").split())
    assert "fixedtext" in shown


def test_edit_traces_mark_everything_outside_the_span_fixed(tiny_checkpoint, tmp_path):
    doc = tmp_path / "note.txt"
    doc.write_text("Keep this line.\nThe {{~quick brown~}} fox.\n", encoding="utf-8")
    path = tmp_path / "edit.jsonl"
    result = runner.invoke(app, ["edit", "-m", str(tiny_checkpoint), "--seed", "1", "--steps", "3",
                                 "--show-steps", "--trace", str(path), str(doc), "Shorter"])
    assert result.exit_code == 0, result.stderr
    trace = read_trace(path)
    assert trace.header["prompt"] == "Shorter" and trace.result["text"] == result.stdout
    steps = [r for r in trace.records if isinstance(r, StepRecord)]
    assert steps and all(r.fixed is not None for r in steps)
    # The first canvas holds the kept line and the span's start: fixed and free positions side by side.
    assert 0 < steps[0].fixed_count < len(steps[0].fixed)
    assert sum(sum(r.fixed) for r in trace.records if isinstance(r, CanvasRecord)) > 0
    replayed = runner.invoke(app, ["replay", str(path), "--speed", "0"])
    assert replayed.exit_code == 0 and replayed.stdout == result.stdout + "\n"


def test_fixed_positions_have_their_own_style_in_the_live_view_and_the_picture():
    state = view.DenoisingState()
    step = StepRecord(canvas=0, canvases=1, step=1, max_steps=2, temperature=1.0, tokens=[5, 6, 7],
                      accepted=[True, False, True], texts=["Dear", "", " Ana"], draft=[5, 9, 7],
                      entropy=[0.0, 3.0, 0.0], mean_entropy=1.0, finished=False, elapsed=0.1,
                      fixed=[True, False, False])
    state.update(step)
    assert [p.style for p in state.current] == [view.FIXED, view.NOISE, view.NEW]
    assert "fixed 1 ·" in state.header().plain
    canvas = CanvasRecord(canvas=0, canvases=1, tokens=[5, 9, 7], texts=["Dear", " dear", " Ana"], steps=2,
                          finished=True, elapsed=0.2, fixed=[True, False, False])
    state.update(canvas)
    assert [p.style for p in state.committed] == [view.FIXED, view.SETTLED, view.SETTLED]
    assert view.plain_line(canvas).endswith("steps fixed 1/3 t=0.20s")
    from diffgen.records.trace import Trace

    rendered = picture.render_picture(Trace({"prompt": "p", "settings": {"max_denoising_steps": 2}},
                                            [step, canvas], None))
    answer = rendered.renderables[2]
    assert [str(span.style) for span in answer.spans][0] == picture.FIXED
    assert "fixed text" in rendered.renderables[4].plain


def test_run_traces_write_no_fixed_field_and_old_lines_read_back_unfixed(tmp_path):
    import io

    record = StepRecord(canvas=0, canvases=1, step=1, max_steps=1, temperature=1.0, tokens=[1], accepted=[True],
                        texts=["a"], draft=[1], entropy=[0.0], mean_entropy=0.0, finished=True, elapsed=0.0)
    out = io.StringIO()
    writer = TraceWriter(out)
    writer.header(model="m", prompt="p", settings={}, canvas_length=1, channel_ids=None)
    writer.update(record)
    assert "fixed" not in json.loads(out.getvalue().splitlines()[1])
    path = tmp_path / "old.jsonl"
    path.write_text(out.getvalue(), encoding="utf-8")
    (read,) = read_trace(path).records
    assert read == record and read.fixed is None and view.plain_line(read).count("fixed") == 0
