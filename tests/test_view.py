"""The live view's frames (recorded Rich consoles) and the plain step lines."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from diffgen.records.trace import CanvasRecord, StepRecord
from diffgen.ui.view import (
    NEW,
    NOISE,
    NOISE_GLYPH,
    DenoisingState,
    LiveView,
    PlainStepLog,
    plain_line,
    render_state,
)

OPEN, CLOSE = 100, 101


def step(n, tokens, accepted, texts, *, canvas=0, canvases=2, max_steps=4, entropy=1.25, temperature=0.7,
         elapsed=0.5):
    return StepRecord(canvas=canvas, canvases=canvases, step=n, max_steps=max_steps, temperature=temperature,
                      tokens=tokens, accepted=accepted, texts=[t if a else "" for t, a in zip(texts, accepted)],
                      draft=tokens, entropy=[entropy] * len(tokens), mean_entropy=entropy, finished=False,
                      elapsed=elapsed)


def recorded(state, width=60, **kwargs):
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True, **kwargs)
    console.print(render_state(state, console.height))
    return console


def styles_of(console, text):
    """The styles Rich recorded for the segments that contain ``text`` (unstyled runs merge)."""
    return [str(segment.style or "none") for segment in console._record_buffer if text in segment.text]


@pytest.fixture
def two_steps():
    state = DenoisingState()
    state.update(CanvasRecord(canvas=0, canvases=2, tokens=[10, 11], texts=["Earlier", " text"], steps=3,
                              finished=False, elapsed=0.3))
    state.update(step(1, [20, 21, 22], [True, False, True], [" kept", " gone", " changes"], canvas=1))
    state.update(step(2, [20, 23, 24], [True, True, False], [" kept", " fresh", " noise"], canvas=1))
    return state


def test_settled_new_and_noise_tokens_have_their_styles(two_steps):
    console = recorded(two_steps)
    assert styles_of(console, " kept") == ["none"]  # accepted before with the same token: settled
    assert styles_of(console, " fresh") == [NEW]  # accepted at this step: highlighted
    assert styles_of(console, NOISE_GLYPH) == [NOISE]  # still noise: a dim glyph, not the random token
    assert styles_of(console, "Earlier") == ["none"]  # committed in an earlier canvas: normal
    assert "noise" not in console.export_text()


def test_header_and_footer(two_steps):
    text = recorded(two_steps, width=120).export_text()
    assert "canvas 2/2 · step 2/4 · T 0.70 · accepted 2/3 · H 1.25" in text
    assert "0.50 s" in text and "tok/s" in text


def test_no_color_keeps_the_distinctions(two_steps):
    console = recorded(two_steps, no_color=True)
    exported = console.export_text(styles=True)
    assert "\x1b[1;7m fresh" in exported  # bold reverse survives NO_COLOR
    assert NOISE_GLYPH in exported


def test_narrow_terminal_and_wide_characters():
    state = DenoisingState()
    state.update(step(1, list(range(6)), [True] * 6, ["日本語", "のテキスト", " 🎉", " emoji", " and", " more"]))
    console = recorded(state, width=40)
    text = console.export_text()
    assert all(console.measure(line).maximum <= 40 for line in text.splitlines())
    assert "日本語のテキスト 🎉" in text


def test_thought_channel_has_its_own_dim_region():
    state = DenoisingState(channel_ids=(OPEN, CLOSE))
    state.update(CanvasRecord(canvas=0, canvases=1, tokens=[OPEN, 5, 6, CLOSE, 7], texts=["", "thought", " pondering",
                              "", "Answer"], steps=2, finished=True, elapsed=0.2))
    thoughts, answer = state.split()
    assert thoughts.plain.strip() == "pondering" and answer.plain == "Answer"
    exported = recorded(state).export_text()
    assert "thinking" in exported and "pondering" in exported
    assert exported.index("pondering") < exported.index("Answer")


def test_control_characters_cannot_reach_the_terminal():
    state = DenoisingState()
    state.update(step(1, [1], [True], ["bell\x07esc\x1b[2J"]))
    exported = recorded(state).export_text()
    assert "\x1b" not in exported and "\x07" not in exported and "␛[2J" in exported


def test_plain_lines():
    record = step(5, [1, 2, 3, 4], [True, True, False, True], ["a", "b", "c", "d"], max_steps=48, entropy=1.234,
                  temperature=0.71)
    assert plain_line(record).startswith("canvas 1/2 step 5/48 accepted 3/4 H=1.23 T=0.71")
    out = io.StringIO()
    with PlainStepLog(out) as log:
        log.update(record)
    assert "\x1b" not in out.getvalue() and out.getvalue().count("\n") == 1


def test_live_view_draws_every_step_when_not_throttled(two_steps):
    console = Console(record=True, width=80, file=io.StringIO(), force_terminal=True)
    with LiveView(console, max_fps=0) as live:
        live.update(step(1, [1, 2], [True, False], ["one", "two"]))
        live.update(step(2, [1, 2], [True, True], ["one", "two"]))
    text = console.export_text()
    assert "step 1/4" in text and "step 2/4" in text
