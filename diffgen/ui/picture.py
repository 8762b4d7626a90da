"""A picture of a denoising run: the final text as a heatmap of when each token settled.

Each committed token is coloured by the step from which the draft (argmax) at its position
never changed again — early steps cool, late steps warm — with a legend, and under it a
per-canvas chart of how many tokens each step accepted. Drawn with Rich on a recording
console and exported as SVG or HTML, so wide characters and escaping are Rich's business.

The colours span the steps the run actually took (the latest settle step of any canvas), not
the step budget: a run that stopped at step 12 of 48 still goes from the first colour to the
last. Every other token is drawn a shade darker, so the boundaries between tokens (a word
made of several tokens, or two tokens that settled together) stay visible.

Clamped positions (``fill``'s template text, ``edit``'s text outside the spans) never
settle: the model was given them. They are drawn in grey on no background (``FIXED``) and
named in the legend, and the colours span the steps of the positions the model chose.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, Group
from rich.text import Text

from diffgen.denoise import channels
from diffgen.records.trace import CanvasRecord, StepRecord, Trace
from diffgen.ui.view import visible

# Eight background colours from early (cool) to late (warm) steps.
PALETTE = ["#313695", "#4575b4", "#74add1", "#abd9e9", "#fee090", "#fdae61", "#f46d43", "#a50026"]
WHITE_TEXT = {0, 1, 7}  # palette indices dark enough for white text
# How much darker every other token is drawn (fraction of each RGB channel taken away).
ALTERNATE_SHADE = 0.14
BARS = "▁▂▃▄▅▆▇█"
FIXED = "grey62"
WIDTH = 100


def settle_steps(steps: Sequence[StepRecord], committed: Sequence[int]) -> list[int]:
    """Per position, the first step (from 1) after which the draft always equalled ``committed``."""
    settled = [len(steps)] * len(committed) if steps else [0] * len(committed)
    for position, token in enumerate(committed):
        for index in range(len(steps) - 1, -1, -1):
            if steps[index].draft[position] != token:
                break
            settled[position] = steps[index].step
    return settled


def buckets(top: int) -> list[tuple[int, int, int]]:
    """``(first step, last step, palette index)`` per colour for a run whose tokens settled by
    step ``top``: one colour per step up to eight steps, spread over the whole palette; beyond
    that, eight ranges of steps."""
    top = max(top, 1)
    if top <= len(PALETTE):
        last = len(PALETTE) - 1
        return [(step, step, round((step - 1) * last / max(top - 1, 1))) for step in range(1, top + 1)]
    return [(index * top // len(PALETTE) + 1, (index + 1) * top // len(PALETTE), index)
            for index in range(len(PALETTE))]


def palette_index(step: int, top: int) -> int:
    """The palette index of a token that settled at ``step`` (from 1) when ``top`` is the latest."""
    step = min(max(step, 1), max(top, 1))
    return next(index for low, high, index in buckets(top) if low <= step <= high)


def _shade(colour: str, amount: float) -> str:
    red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(c * (1 - amount)):02x}" for c in (red, green, blue))


def _colour(step: int, top: int, alternate: bool = False) -> str:
    index = palette_index(step, top)
    text = "white" if index in WHITE_TEXT else "black"
    background = _shade(PALETTE[index], ALTERNATE_SHADE) if alternate else PALETTE[index]
    return f"{text} on {background}"


def _canvases(trace: Trace) -> list[tuple[list[StepRecord], CanvasRecord]]:
    out, steps = [], []
    for record in trace.records:
        if isinstance(record, StepRecord):
            steps.append(record)
        else:
            out.append((steps, record))
            steps = []
    return out


def _legend(top: int, budget: int, fixed: bool = False) -> Text:
    legend = Text("settled at step: ", style="bold")
    for low, high, _ in buckets(top):
        if high < low:
            continue
        label = f" {low}" + (f"–{high} " if high > low else " ")
        legend.append(label, style=_colour(low, top))
        legend.append(" ")
    legend.append(f"of {top} taken ({budget} allowed)", style="dim")
    if fixed:
        legend.append("  ")
        legend.append("fixed text", style=FIXED)
        legend.append(" (clamped, not chosen)", style="dim")
    return legend


def _chart(canvases: list[tuple[list[StepRecord], CanvasRecord]]) -> Group:
    lines = [Text("accepted tokens per step", style="bold")]
    for steps, canvas in canvases:
        counts = [s.accepted_count for s in steps]
        top = max(counts, default=0) or 1
        bars = "".join(BARS[min(len(BARS) - 1, c * len(BARS) // (top + 1))] for c in counts)
        line = Text(f"canvas {canvas.canvas + 1:>2}  ", style="dim")
        line.append(bars, style="#4575b4")
        line.append(f"  {len(counts)} steps, max {top}/{len(canvas.tokens)}", style="dim")
        lines.append(line)
    return Group(*lines)


def render_picture(trace: Trace) -> Group:
    """The heatmap text, its legend and the per-step chart as one Rich renderable."""
    canvases = _canvases(trace)
    budget = int(trace.header.get("settings", {}).get("max_denoising_steps") or 1)
    settled = [settle_steps(steps, canvas.tokens) for steps, canvas in canvases]
    fixed = [canvas.fixed or [False] * len(canvas.tokens) for _, canvas in canvases]
    top = max((step for canvas, pinned in zip(settled, fixed) for step, f in zip(canvas, pinned) if not f),
              default=1)
    thoughts, answer = Text(), Text()
    tokens = [token for _, canvas in canvases for token in canvas.tokens]
    parts = iter(channels.route(tokens, trace.channel_ids))
    shown = 0  # tokens drawn so far: every other one a shade darker
    for (steps, canvas), steps_settled, pinned in zip(canvases, settled, fixed):
        for token, text, step, is_fixed in zip(canvas.tokens, canvas.texts, steps_settled, pinned):
            part = next(parts)
            if part is not None and text:
                target = thoughts if part == channels.THOUGHT else answer
                if is_fixed:
                    target.append(visible(text), style=FIXED)
                    continue
                target.append(visible(text), style=_colour(step, top, alternate=shown % 2 == 1))
                shown += 1
    prompt = " ".join(str(trace.header.get("prompt", "")).split())
    parts = [Text(f"prompt: {prompt[:200]}", style="bold")]
    if thoughts.plain.strip():
        parts += [Text("thinking:", style="dim bold"), thoughts]
    parts += [Text(), answer, Text(), _legend(top, budget, any(any(f) for f in fixed)), Text(), _chart(canvases)]
    return Group(*parts)


#: Written near the top of every picture, so that ``replay`` knows a file it may replace.
MARK = "<!-- diffgen replay picture -->"


def export(trace: Trace, svg: Path | None = None, html: Path | None = None) -> list[Path]:
    """Write the picture as SVG and/or HTML (each atomically, see :mod:`diffgen.outputs`); return
    the paths written."""
    from diffgen import outputs

    console = Console(record=True, width=WIDTH, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print(render_picture(trace))
    written = []
    if svg is not None:
        text = console.export_svg(title=TITLE, clear=False)
        outputs.write_text(Path(svg), _marked(text, "<svg"), "--svg")
        written.append(Path(svg))
    if html is not None:
        text = console.export_html(inline_styles=True, clear=False)
        outputs.write_text(Path(html), _marked(text, "<html"), "--html")
        written.append(Path(html))
    return written


TITLE = "diffgen: when each token settled"


def _marked(text: str, tag: str) -> str:
    """``text`` with :data:`MARK` right after its first ``tag`` element opens."""
    at = text.find(tag)
    end = text.find(">", at) if at >= 0 else -1
    return text[:end + 1] + "\n" + MARK + text[end + 1:] if end >= 0 else MARK + "\n" + text
