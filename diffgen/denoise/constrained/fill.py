"""Infilling: a template's holes denoised conditioned on the text on both sides.

A template is text with holes: ``{{}}`` (a hole of :data:`DEFAULT_HOLE` tokens) or ``{{N}}``
(N tokens). :func:`parse_template` splits it (no torch, no tokenizer: the CLI checks a
template before anything is loaded); :func:`fill` lays it out on the canvases after the
prompt and runs the ordinary loop with every fixed token clamped
(:class:`~diffgen.denoise.step.StepContext`):

* each fixed piece is tokenised on its own (no special tokens) and its tokens are clamped at
  every step of every canvas it lands on; a hole of N tokens is N free positions;
* the layout runs on across canvases: a template longer than one canvas splits over several,
  holes included, and a canvas that holds no free position is committed as is, without a
  decoder pass (fixed text encoded as context for the next canvas);
* the positions after the template, up to the end of its last canvas, are clamped to pad;
* a hole's text is its tokens cut at the first EOS and decoded without special tokens (pad
  included), so a hole of N tokens may come back shorter — the model ends a hole early by
  putting an EOS or pad there — never longer;
* the output is the template's own fixed text, byte for byte, with each hole replaced by its
  text (the fixed tokens are clamped, so they are what the model saw, but the output does
  not depend on the tokenizer decoding them back to the same bytes).

A hole's confidence is the mean entropy (nats) of its positions at the last step of its
canvas (0 would be certain; a random model sits near ``ln(vocab)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffgen.denoise.options import Execution
from diffgen.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from diffgen.denoise.events import Event
    from diffgen.images import VisionInputs
    from diffgen.loading.loader import LoadedModel
    from diffgen.settings import GenerationSettings

#: Tokens in a ``{{}}`` hole.
DEFAULT_HOLE = 16
#: Longest hole a template may ask for (tokens).
MAX_HOLE = 4096
_OPEN, _CLOSE = "{{", "}}"


@dataclass(frozen=True)
class Hole:
    """A hole in a template.

    Attributes:
        length: canvas positions (tokens) the hole may use.
    """

    length: int


@dataclass(frozen=True)
class Template:
    """A parsed template.

    Attributes:
        pieces: the template in order: fixed text (``str``, never empty) and :class:`Hole`.
    """

    pieces: tuple[str | Hole, ...]

    @property
    def holes(self) -> tuple[Hole, ...]:
        return tuple(piece for piece in self.pieces if isinstance(piece, Hole))


def parse_template(text: str) -> Template:
    """Split ``text`` into fixed text and holes; a malformed template is a :class:`UsageError`.

    ``{{}}`` is a hole of :data:`DEFAULT_HOLE` tokens, ``{{N}}`` one of N (1 to
    :data:`MAX_HOLE`; spaces around N are allowed). A ``{{`` with no ``}}`` after it, a hole
    whose inside is not a whole number, and a template with no hole at all are refused. A
    lone ``}}`` is fixed text.
    """
    hint = "write holes as {{}} (16 tokens) or {{N}} (N tokens), e.g. 'Dear {{4}}, thanks for {{}}.'"
    pieces: list[str | Hole] = []
    at = 0
    while True:
        start = text.find(_OPEN, at)
        if start < 0:
            if at < len(text):
                pieces.append(text[at:])
            break
        end = text.find(_CLOSE, start + len(_OPEN))
        if end < 0:
            raise UsageError(f"the template has an unclosed {{{{ at character {start + 1}", hint)
        inside = text[start + len(_OPEN):end].strip()
        if inside == "":
            length = DEFAULT_HOLE
        elif re.fullmatch(r"[0-9]+", inside):
            length = int(inside)
            if not 1 <= length <= MAX_HOLE:
                raise UsageError(f"the hole {{{{{inside}}}}} at character {start + 1} must hold 1 to {MAX_HOLE} "
                                 "tokens", hint)
        else:
            raise UsageError(f"the hole {{{{{inside}}}}} at character {start + 1} is not a number of tokens", hint)
        if start > at:
            pieces.append(text[at:start])
        pieces.append(Hole(length))
        at = end + len(_CLOSE)
    template = Template(tuple(pieces))
    if not template.holes:
        raise UsageError("the template has no hole to fill", hint)
    return template


@dataclass(frozen=True)
class Layout:
    """A template laid out on canvases.

    Attributes:
        tokens: the template's token ids position by position (pad in holes and after the end),
            ``canvases x canvas_length`` long.
        fixed: per position, whether it is clamped (fixed text or pad after the end).
        spans: per hole, ``(start, end)`` positions in the generated sequence (end exclusive).
        length: positions the template itself takes (fixed tokens plus hole lengths).
    """

    tokens: tuple[int, ...]
    fixed: tuple[bool, ...]
    spans: tuple[tuple[int, int], ...]
    length: int


def layout(template: Template, tokenizer: PreTrainedTokenizerBase, canvas_length: int, pad_token_id: int) -> Layout:
    """Tokenise the fixed text and place everything on whole canvases."""
    tokens: list[int] = []
    fixed: list[bool] = []
    spans: list[tuple[int, int]] = []
    for piece in template.pieces:
        if isinstance(piece, Hole):
            spans.append((len(tokens), len(tokens) + piece.length))
            tokens += [pad_token_id] * piece.length
            fixed += [False] * piece.length
        else:
            ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
            tokens += ids
            fixed += [True] * len(ids)
    length = len(tokens)
    total = -(-length // canvas_length) * canvas_length
    tokens += [pad_token_id] * (total - length)
    fixed += [True] * (total - length)
    return Layout(tuple(tokens), tuple(fixed), tuple(spans), length)


@dataclass(frozen=True)
class FilledHole:
    """One filled hole.

    Attributes:
        text: the hole's text (cut at the first EOS, special tokens dropped).
        start: first position of the hole in the generated sequence (0 = first canvas position).
        end: one past its last position (``end - start`` = the hole's length).
        token_ids: the hole's tokens as the model left them, all ``end - start`` of them.
        mean_entropy: mean entropy (nats) of the hole's positions at the last step of its canvas.
    """

    text: str
    start: int
    end: int
    token_ids: tuple[int, ...]
    mean_entropy: float


@dataclass(frozen=True)
class FillResult:
    """A filled template.

    Attributes:
        text: the template with every hole replaced by its text.
        holes: the holes in template order.
        token_ids: every generated position, ``canvases x canvas_length`` of them (fixed text,
            holes, pad after the end).
        layout: the layout the generation ran on.
        prompt_tokens: tokens in the encoder prefix.
        steps_per_canvas: decoder passes per canvas (0 for a canvas of fixed text only).
        settings: the settings used.
        seconds: wall time of the generation, prefill included.
    """

    text: str
    holes: tuple[FilledHole, ...]
    token_ids: tuple[int, ...]
    layout: Layout
    prompt_tokens: int
    steps_per_canvas: tuple[int, ...]
    settings: GenerationSettings
    seconds: float


def fill_settings(settings: GenerationSettings, plan: Layout) -> GenerationSettings:
    """``settings`` with ``max_new_tokens`` set to the layout's whole canvases."""
    return settings.replace(max_new_tokens=len(plan.tokens))


def fill(loaded: LoadedModel, prefix: Sequence[int], template: Template | str, settings: GenerationSettings,
         *, execution: Execution = Execution(), on_event: Callable[[Event], None] | None = None,
         vision: VisionInputs | None = None) -> FillResult:
    """Fill ``template``'s holes after the encoder prefix ``prefix`` (token ids, at least one).

    ``execution``: how the loop runs (:class:`~diffgen.denoise.options.Execution`). ``on_event``
    is called with every loop event (``--show-steps``, ``--trace``). ``vision``: the prefix's
    image inputs (:class:`~diffgen.images.VisionInputs`), if it shows images.
    """
    import time

    if isinstance(template, str):
        template = parse_template(template)
    start = time.perf_counter()
    canvas_length = int(loaded.model.config.canvas_length)
    plan = layout(template, loaded.tokenizer, canvas_length, settings.pad_token_id)
    settings = fill_settings(settings, plan)
    tokens, entropy, steps = run_layout(loaded, prefix, plan, settings, execution=execution, on_event=on_event,
                                        vision=vision)
    eos = set(settings.eos_token_ids)
    holes = []
    for begin, end in plan.spans:
        ids = tokens[begin:end]
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        text = loaded.tokenizer.decode(ids[:cut], skip_special_tokens=True)
        holes.append(FilledHole(text=text, start=begin, end=end, token_ids=tuple(ids),
                                mean_entropy=sum(entropy[begin:end]) / (end - begin)))
    parts, filled = [], iter(holes)
    for piece in template.pieces:
        parts.append(next(filled).text if isinstance(piece, Hole) else piece)
    return FillResult(text="".join(parts), holes=tuple(holes), token_ids=tuple(tokens), layout=plan,
                      prompt_tokens=len(prefix), steps_per_canvas=tuple(steps), settings=settings,
                      seconds=time.perf_counter() - start)


def run_layout(loaded: LoadedModel, prefix: Sequence[int], plan: Layout, settings: GenerationSettings, *,
               execution: Execution = Execution(), init: Sequence[int | None] | None = None,
               on_event: Callable[[Event], None] | None = None, vision: VisionInputs | None = None
               ) -> tuple[list[int], list[float], list[int]]:
    """Denoise ``plan``'s free positions with its fixed ones clamped (``settings`` from :func:`fill_settings`).

    ``init``: per position, the token a free position starts from instead of noise, or
    ``None`` for noise (editing). Returns every position's committed token, its entropy
    (nats) at the last step of its canvas (0 on canvases of fixed text only) and the decoder
    passes each canvas took. ``on_event`` is called with every loop event, in order. ``vision``:
    the prefix's image inputs, or ``None``.
    """
    import torch

    from diffgen.denoise.loop import CanvasEvent, Constraints, StepEvent, stream

    canvas_length = int(loaded.model.config.canvas_length)
    clamp = (torch.tensor([plan.tokens], dtype=torch.long), torch.tensor([plan.fixed], dtype=torch.bool))
    seed = None
    if init is not None:
        seed = (torch.tensor([[settings.pad_token_id if t is None else t for t in init]], dtype=torch.long),
                torch.tensor([[t is not None for t in init]], dtype=torch.bool))
    generation = stream(loaded, [list(prefix)], settings, observe=True, execution=execution,
                        constraints=Constraints(clamp=clamp, init=seed), vision=[vision] if vision is not None else None)
    committed: list[list[int]] = []
    entropies: list[list[float]] = []
    steps: list[int] = []
    last_entropy = None
    for event in generation:
        if on_event is not None:
            on_event(event)
        if isinstance(event, StepEvent):
            last_entropy = event.token_entropy
        elif isinstance(event, CanvasEvent):
            committed.append(event.tokens[0].tolist())
            entropies.append([0.0] * canvas_length if event.steps == 0 or last_entropy is None
                             else last_entropy[0].tolist())
            steps.append(event.steps)
            last_entropy = None
    tokens = [t for canvas in committed for t in canvas]
    entropy = [h for canvas in entropies for h in canvas]
    return tokens, entropy, steps
