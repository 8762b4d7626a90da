"""JSON by construction: a JSON Schema's skeleton clamped on the canvas, each value slot restricted.

The model has no mask token and re-decides every position at every step, so the skeleton is
clamped (:mod:`diffgen.denoise.constrained.fill`'s machinery) and every value slot gets a fixed number of
positions, each with its own allowed vocabulary, enforced on the logits before temperature and
sampling (``StepContext.allowed``). The output parses and validates for any seed and any model,
a random one included:

* keys, quotes, colons, commas, braces and brackets are fixed text, clamped at every step;
* a string slot's positions allow the tokens whose text has no ``"``, no ``\\`` and no control
  character, plus pad (a *filler* that decodes to nothing), so a string of N positions holds
  0 to N tokens; the value is cut to ``maxLength`` characters when a token carried it past;
* an integer slot is ``[pad|-|digit] digit [digit|pad]...`` (single-digit tokens; ``-`` only
  where ``minimum`` is negative or absent), one position per digit of the wider bound (plus a
  sign position where ``minimum`` is negative), 8 without both bounds; a number slot the same
  with ``.`` allowed after the second position and 3 more positions (10 without both bounds);
  the value is parsed (leading zeros and extra points dropped) and clamped into
  ``minimum``/``maximum`` (the slot's ``repaired`` says so);
* booleans and ``enum`` are a choice among the literals' tokens: position i allows token i of
  every literal (pad where a literal is shorter), and the value is the literal that matches
  the most positions (``repaired`` when none matches exactly); ``null`` is fixed text;
* arrays lay out ``maxItems`` items (``minItems`` when only that is given), so a bounded array
  always comes back at its upper bound.

The output is assembled slot by slot from the skeleton and each slot's rendered value (pad
dropped), so it does not depend on the tokenizer decoding the whole canvas back to the same
bytes. A slot's confidence is the mean entropy (nats) of its positions at the last step of its
canvas; ``retries`` resamples the slots above :data:`RETRY_ENTROPY` with the rest clamped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffgen.denoise.constrained.schema_check import check_schema, load_schema
from diffgen.denoise.constrained.schema_layout import SchemaLayout, Slot, layout, skeleton
from diffgen.denoise.constrained.schema_vocab import Vocabulary, vocabulary
from diffgen.denoise.options import Execution

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from diffgen.loading.loader import LoadedModel
    from diffgen.settings import GenerationSettings

# The schema's parts, one import for callers: the subset (schema_check), the layout (schema_layout),
# the vocabulary's token classes (schema_vocab); this module generates and assembles the value.
__all__ = ["RETRY_ENTROPY", "FilledSlot", "SchemaLayout", "SchemaResult", "Slot", "Vocabulary", "check_schema",
           "generate_json", "generate_json_rows", "layout", "load_schema", "render_slot", "skeleton", "vocabulary"]

#: A slot whose mean entropy (nats) ends above this is resampled by a retry.
RETRY_ENTROPY = 1.0


# -- assembling the value -----------------------------------------------------------------------


def render_slot(slot: Slot, ids: Sequence[int], literals: Sequence[Sequence[int]],
                tokenizer: PreTrainedTokenizerBase, pad: int) -> tuple[Any, str, str | None]:
    """``(value, JSON literal, repair note or None)`` of one slot's tokens."""
    kept = [t for t in ids if t != pad]
    if slot.kind == "enum":
        padded = [list(o) + [pad] * (slot.length - len(o)) for o in literals]
        scores = [sum(a == b for a, b in zip(option, ids)) for option in padded]
        best = max(range(len(padded)), key=lambda k: scores[k])
        value = slot.options[best]
        note = None if list(ids) == padded[best] else "tokens matched no option exactly; nearest option taken"
        return value, json.dumps(value, ensure_ascii=False), note
    text = tokenizer.decode(kept, skip_special_tokens=True)
    if slot.kind == "string":
        note = None
        if slot.max_length is not None and len(text) > slot.max_length:
            text, note = text[:slot.max_length], f"cut to maxLength {slot.max_length}"
        # The quotes are the skeleton's (clamped); the slot renders the string's inside.
        return text, json.dumps(text, ensure_ascii=False)[1:-1], note
    match = re.fullmatch(r"(-?)(\d+)(?:\.([\d.]*))?", text)
    if match is None:  # unreachable with the slot's vocabulary; kept so a surprise still parses
        sign, whole, fraction, note = "", "0", "", f"tokens {text!r} are not a number; 0 taken"
    else:
        sign, whole, fraction, note = match.group(1), match.group(2), (match.group(3) or "").replace(".", ""), None
    if slot.kind == "integer":
        value: Any = int(sign + whole)
    else:
        value = float(f"{sign}{whole}.{fraction or '0'}")
        if value.is_integer() and not fraction:
            value = int(value)
    if slot.minimum is not None and value < slot.minimum:
        value, note = slot.minimum, f"{sign}{whole} below minimum {slot.minimum}; clamped"
    elif slot.maximum is not None and value > slot.maximum:
        value, note = slot.maximum, f"{sign}{whole} above maximum {slot.maximum}; clamped"
    return value, json.dumps(value), note


@dataclass(frozen=True)
class FilledSlot:
    """One value slot after generation.

    Attributes:
        path: JSON pointer of the value.
        kind: the slot's kind (``string``, ``integer``, ``number``, ``enum``).
        value: the value as Python (``str``, ``int``, ``float``, ``bool``, ``None``).
        start: first position of the slot in the generated sequence.
        end: one past its last position.
        token_ids: the slot's tokens as the model left them (pad included).
        mean_entropy: mean entropy (nats) of the slot's positions at the last step of its canvas
            (a confidence: lower is surer).
        repaired: what assembling changed (clamped into bounds, cut to maxLength, nearest enum
            option), or ``None``.
        attempts: generations the slot went through (1 + the retries that resampled it).
    """

    path: str
    kind: str
    value: Any
    start: int
    end: int
    token_ids: tuple[int, ...]
    mean_entropy: float
    repaired: str | None
    attempts: int


@dataclass(frozen=True)
class SchemaResult:
    """A JSON value generated to a schema.

    Attributes:
        text: the JSON text (parses and validates against the schema).
        value: the parsed value.
        slots: the value slots in skeleton order.
        token_ids: every generated position of the last attempt (``canvases x canvas_length``).
        layout: the layout the generation ran on.
        prompt_tokens: tokens in the encoder prefix.
        steps_per_canvas: decoder passes per canvas of each attempt, attempt by attempt.
        forwards: decoder passes in all, retries included.
        settings: the settings used.
        seconds: wall time, prefill and retries included.
    """

    text: str
    value: Any
    slots: tuple[FilledSlot, ...]
    token_ids: tuple[int, ...]
    layout: SchemaLayout
    prompt_tokens: int
    steps_per_canvas: tuple[tuple[int, ...], ...]
    forwards: int
    settings: GenerationSettings
    seconds: float


def _run_once(loaded: LoadedModel, prefixes: Sequence[Sequence[int]], plan: SchemaLayout,
              settings: GenerationSettings, tokens: Sequence[Sequence[int]], fixed: Sequence[Sequence[bool]],
              seeds: Sequence[int] | None, execution: Execution
              ) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """One generation of every row: per row the committed tokens and last-step entropies, and
    the batch's decoder passes per canvas."""
    import torch

    from diffgen.denoise.loop import CanvasEvent, Constraints, StepEvent, stream

    vocab_size = int(loaded.model.config.text_config.vocab_size)
    canvas_length = int(loaded.model.config.canvas_length)
    _, _, allowed = plan.tensors(vocab_size)
    clamp = (torch.tensor([list(row) for row in tokens], dtype=torch.long),
             torch.tensor([list(row) for row in fixed], dtype=torch.bool))
    generation = stream(loaded, [list(p) for p in prefixes], settings, observe=True, seeds=seeds,
                        execution=execution, constraints=Constraints(clamp=clamp, allowed=allowed))
    rows = len(prefixes)
    committed: list[list[int]] = [[] for _ in range(rows)]
    entropy: list[list[float]] = [[] for _ in range(rows)]
    steps: list[int] = []
    last = None
    for event in generation:
        if isinstance(event, StepEvent):
            last = event.token_entropy
        elif isinstance(event, CanvasEvent):
            for row in range(rows):
                committed[row] += event.tokens[row].tolist()
                entropy[row] += ([0.0] * canvas_length if event.steps == 0 or last is None
                                 else last[row].tolist())
            steps.append(event.steps)
            last = None
    return committed, entropy, steps


def generate_json(loaded: LoadedModel, prefix: Sequence[int], schema: dict, settings: GenerationSettings, *,
                  retries: int = 0, execution: Execution = Execution(),
                  vocab: Vocabulary | None = None) -> SchemaResult:
    """Generate a JSON value for ``schema`` after the encoder prefix ``prefix`` (token ids, at least one).

    Each retry (up to ``retries``) re-denoises, with the next seed, every slot whose mean entropy
    is above :data:`RETRY_ENTROPY`, with the skeleton and every other slot clamped to its tokens;
    a slot keeps its new tokens only when their mean entropy is lower.
    """
    return generate_json_rows(loaded, [prefix], schema, settings, retries=retries, execution=execution,
                              vocab=vocab)[0]


def generate_json_rows(loaded: LoadedModel, prefixes: Sequence[Sequence[int]], schema: dict,
                       settings: GenerationSettings, *, seeds: Sequence[int] | None = None, retries: int = 0,
                       execution: Execution = Execution(), vocab: Vocabulary | None = None
                       ) -> list[SchemaResult]:
    """:func:`generate_json` for several prefixes batched together (one seed per row, or
    ``settings.seed`` as the loop derives row seeds); one result per prefix, in order."""
    import time

    start = time.perf_counter()
    check_schema(schema)
    canvas_length = int(loaded.model.config.canvas_length)
    vocab_size = int(loaded.model.config.text_config.vocab_size)
    if vocab is None:
        vocab = vocabulary(loaded.tokenizer, vocab_size, settings.pad_token_id)
    plan = layout(schema, loaded.tokenizer, vocab, canvas_length)
    settings = settings.replace(max_new_tokens=len(plan.tokens))
    rows = len(prefixes)
    tokens, entropy, steps = _run_once(loaded, prefixes, plan, settings, [plan.tokens] * rows, [plan.fixed] * rows,
                                       seeds, execution)
    all_steps = [tuple(steps)]
    attempts = [[1] * len(plan.spans) for _ in range(rows)]
    for retry in range(1, retries + 1):
        means = [[sum(entropy[r][a:b]) / (b - a) for a, b in plan.spans] for r in range(rows)]
        redo = [[k for k, m in enumerate(means[r]) if m > RETRY_ENTROPY] for r in range(rows)]
        if not any(redo):
            break
        fixed = [list(plan.fixed) for _ in range(rows)]
        for r in range(rows):
            for k, (a, b) in enumerate(plan.spans):
                if k not in redo[r]:
                    fixed[r][a:b] = [True] * (b - a)
        retry_seeds = None if seeds is None else [seed + retry for seed in seeds]
        seed = None if settings.seed is None else settings.seed + retry
        new_tokens, new_entropy, steps = _run_once(loaded, prefixes, plan, settings.replace(seed=seed), tokens,
                                                   fixed, retry_seeds, execution)
        all_steps.append(tuple(steps))
        for r in range(rows):
            for k in redo[r]:
                a, b = plan.spans[k]
                attempts[r][k] += 1
                if sum(new_entropy[r][a:b]) / (b - a) < means[r][k]:
                    tokens[r][a:b], entropy[r][a:b] = new_tokens[r][a:b], new_entropy[r][a:b]
    seconds = time.perf_counter() - start
    results = []
    for r in range(rows):
        slots, parts = [], []
        filled = iter(range(len(plan.spans)))
        for piece in plan.pieces:
            if isinstance(piece, str):
                parts.append(piece)
                continue
            k = next(filled)
            a, b = plan.spans[k]
            value, literal, note = render_slot(piece, tokens[r][a:b], plan.literals[k], loaded.tokenizer, vocab.pad)
            parts.append(literal)
            slots.append(FilledSlot(path=piece.path, kind=piece.kind, value=value, start=a, end=b,
                                    token_ids=tuple(tokens[r][a:b]), mean_entropy=sum(entropy[r][a:b]) / (b - a),
                                    repaired=note, attempts=attempts[r][k]))
        text = "".join(parts)
        results.append(SchemaResult(
            text=text, value=json.loads(text), slots=tuple(slots), token_ids=tuple(tokens[r]), layout=plan,
            prompt_tokens=len(prefixes[r]), steps_per_canvas=tuple(all_steps),
            forwards=sum(sum(s) for s in all_steps), settings=settings.replace(seed=seeds[r]) if seeds else settings,
            seconds=seconds))
    return results
