"""Traces: what --trace writes, replay from it, and the SVG/HTML picture."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from diffgen.cli.app import app
from diffgen.ui.picture import settle_steps
from diffgen.records.trace import CanvasRecord, StepRecord, read_trace
from diffgen.ui.view import visible

runner = CliRunner()
RUN = ["run", "--seed", "3", "-n", "32", "--steps", "5", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def traced(tiny_checkpoint, tmp_path_factory):
    """One traced run with --show-steps (stderr is not a terminal here: plain lines)."""
    path = tmp_path_factory.mktemp("trace") / "run.jsonl"
    result = runner.invoke(app, [*RUN, "-m", str(tiny_checkpoint), "--show-steps", "--trace", str(path)])
    assert result.exit_code == 0, result.stderr
    return path, result


def test_trace_schema(traced, tiny):
    path, _ = traced
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["type"] for line in lines[:1] + lines[-1:]] == ["header", "result"]
    header = lines[0]
    assert header["version"] == 1 and header["prompt"] == "Why is the sky blue?"
    assert header["settings"]["max_denoising_steps"] == 5 and header["canvas_length"] == 16
    steps = [line for line in lines if line["type"] == "step"]
    canvases = [line for line in lines if line["type"] == "canvas"]
    assert len(canvases) in (1, 2) and len(steps) == 5 * len(canvases)
    for line in steps:
        assert len(line["tokens"]) == len(line["accepted"]) == len(line["entropy"]) == len(line["draft"]) == 16
        assert {"temperature", "mean_entropy", "elapsed", "texts", "finished"} <= set(line)
    assert steps[0]["temperature"] == pytest.approx(0.8)
    assert lines[-1]["finish_reason"] in {"eos", "length"}


def test_show_steps_prints_plain_lines_when_stderr_is_not_a_terminal(traced):
    _, result = traced
    lines = [line for line in result.stderr.splitlines() if line.startswith("canvas ")]
    assert lines[0].startswith("canvas 1/2 step 1/5 accepted ") and " H=" in lines[0] and " T=0.80" in lines[0]
    canvases = sum(1 for line in lines if "committed" in line)
    assert canvases >= 1 and len(lines) == 6 * canvases  # 5 steps + 1 commit line per canvas
    assert "\x1b" not in result.stderr


def test_stdout_is_identical_with_and_without_show_steps(traced, tiny_checkpoint):
    _, with_view = traced
    without = runner.invoke(app, [*RUN, "-m", str(tiny_checkpoint)])
    assert with_view.stdout == without.stdout


def test_replay_round_trip(traced):
    path, run_result = traced
    replayed = runner.invoke(app, ["replay", str(path), "--speed", "0"])
    assert replayed.exit_code == 0, replayed.stderr
    assert replayed.stdout == run_result.stdout
    run_lines = [line for line in run_result.stderr.splitlines() if line.startswith("canvas ")]
    assert [line for line in replayed.stderr.splitlines() if line.startswith("canvas ")] == run_lines


def test_read_trace_gives_back_the_records(traced):
    trace = read_trace(traced[0])
    assert trace.channel_ids == (100, 101)
    assert isinstance(trace.records[0], StepRecord) and isinstance(trace.records[5], CanvasRecord)


def test_a_record_reads_back_from_the_server_stream_as_it_was(traced):
    """The trace's records and the server stream's ``diffgen_step`` / ``diffgen_canvas`` payloads are
    two shapes of one record, mapped in one place: every record of a real run (clamped positions
    included) comes back equal, and the payload carries the published names as JSON."""
    records = read_trace(traced[0]).records
    clamped = records[0].__class__(**{**records[0].__dict__, "fixed": [True] + [False] * (len(records[0].tokens) - 1)})
    for record in [*records, clamped]:
        payload = json.loads(json.dumps(record.to_stream()))
        assert type(record).from_stream(payload) == record
    step = records[0].to_stream()
    assert {"canvas_tokens", "token_entropy", "draft", "accepted", "texts", "fixed"} <= step.keys()
    assert set(step["accepted"]) <= {0, 1} and clamped.to_stream()["fixed"][:2] == [1, 0]


def test_svg_is_well_formed_and_shows_every_token(traced, tmp_path):
    path, _ = traced
    svg, html = tmp_path / "run.svg", tmp_path / "run.html"
    result = runner.invoke(app, ["replay", str(path), "--svg", str(svg), "--html", str(html)])
    assert result.exit_code == 0, result.stderr
    root = ET.parse(svg).getroot()
    shown = "".join("".join(node.itertext()) for node in root.iter() if node.tag.endswith("text"))
    shown = "".join(shown.replace("\xa0", " ").split())
    trace = read_trace(path)
    texts = [t for r in trace.records if isinstance(r, CanvasRecord) for t in r.texts if t.strip()]
    assert texts
    for text in texts:
        assert "".join(visible(text).split()) in shown
    assert "settled at step" in shown.replace(" ", "") or "settledatstep" in shown
    assert "acceptedtokensperstep" in shown
    assert html.read_text().lstrip().lower().startswith("<!doctype html>")


def test_settle_step_is_when_the_draft_stopped_changing():
    def record(n, draft):
        return StepRecord(canvas=0, canvases=1, step=n, max_steps=4, temperature=1.0, tokens=draft,
                          accepted=[True] * 3, texts=["x"] * 3, draft=draft, entropy=[0.0] * 3,
                          mean_entropy=0.0, finished=False, elapsed=0.0)

    steps = [record(1, [5, 1, 9]), record(2, [5, 2, 9]), record(3, [5, 3, 8]), record(4, [5, 3, 9])]
    assert settle_steps(steps, [5, 3, 9]) == [1, 3, 4]


@pytest.mark.parametrize("content, words", [
    ("not json\n", "trace line"),
    ('{"type": "step"}\n', "trace line"),
    ("\n", "no trace header"),
    ('{"type": "header", "version": 99}\n', "version 99"),
])
def test_bad_traces_are_usage_errors(tmp_path, content, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    result = runner.invoke(app, ["replay", str(path)])
    assert result.exit_code == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def stopped_early_trace(settled_at=12, budget=48, tokens=12):
    """One canvas whose position i settled at step 1 + i * (settled_at - 1) // (tokens - 1), the
    last at ``settled_at``: the run stopped there, well inside its ``budget`` of steps."""
    from diffgen.records.trace import Trace

    final = list(range(10, 10 + tokens))
    when = [1 + i * (settled_at - 1) // (tokens - 1) for i in range(tokens)]
    steps = []
    for step in range(1, settled_at + 1):
        draft = [token if when[i] <= step else 0 for i, token in enumerate(final)]
        steps.append(StepRecord(canvas=0, canvases=1, step=step, max_steps=budget, temperature=1.0, tokens=draft,
                                accepted=[d != 0 for d in draft], texts=["ab"] * tokens, draft=draft,
                                entropy=[0.0] * tokens, mean_entropy=0.0, finished=step == settled_at, elapsed=0.0))
    canvas = CanvasRecord(canvas=0, canvases=1, tokens=final, texts=[f"t{i}" for i in range(tokens)],
                          steps=settled_at, finished=True, elapsed=0.0)
    return Trace(header={"prompt": "p", "settings": {"max_denoising_steps": budget}}, records=[*steps, canvas],
                 result=None), when


def answer_styles(trace):
    from diffgen.ui.picture import render_picture

    answer = render_picture(trace).renderables[2]  # prompt, blank line, answer, ...
    return [(answer.plain[span.start:span.end], str(span.style)) for span in answer.spans]


def test_a_run_that_stopped_at_step_12_spans_the_whole_palette():
    from diffgen.ui.picture import PALETTE, palette_index

    trace, when = stopped_early_trace(settled_at=12, budget=48)
    styles = answer_styles(trace)
    assert [text for text, _ in styles] == [f"t{i}" for i in range(12)]
    assert palette_index(1, 12) == 0 and palette_index(12, 12) == len(PALETTE) - 1
    first, last = styles[0][1], styles[-2][1]  # even positions are drawn in the palette's own colours
    assert first.endswith(PALETTE[0]) and last.endswith(PALETTE[-1])
    used = {palette_index(step, 12) for step in when}
    assert len(used) >= 6  # not two near-identical blues: most of the palette shows
    # Against the 48-step budget, these steps would all have fallen in the first two colours.
    assert {min(7, (step - 1) * 8 // 48) for step in when} <= {0, 1}


def test_adjacent_tokens_that_settled_together_stay_apart():
    from diffgen.ui.picture import PALETTE

    trace, _ = stopped_early_trace(settled_at=1, budget=48, tokens=4)  # every token settled at step 1
    backgrounds = [style.split(" on ")[1] for _, style in answer_styles(trace)]
    assert backgrounds[0] == backgrounds[2] == PALETTE[0]
    assert backgrounds[1] == backgrounds[3] != PALETTE[0]  # every other token a shade darker: a visible boundary


def test_legend_names_the_steps_taken_and_the_budget():
    from diffgen.ui.picture import render_picture

    trace, _ = stopped_early_trace(settled_at=12, budget=48)
    legend = render_picture(trace).renderables[4].plain
    assert legend.startswith("settled at step:") and "12–12" not in legend and "of 12 taken (48 allowed)" in legend
    assert " 1 " in legend and "–12" in legend and "48" not in legend.split("of 12")[0]
