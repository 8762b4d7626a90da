"""JSON by construction: a JSON Schema's skeleton clamped on the canvas, each value slot restricted.

The model has no mask token and re-decides every position at every step, so the skeleton is
clamped (:mod:`diffgen.denoise.fill`'s machinery) and every value slot gets a fixed number of
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
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffgen.errors import UsageError

if TYPE_CHECKING:
    from diffgen.loading.loader import LoadedModel
    from diffgen.settings import GenerationSettings

#: Positions of a string slot without ``maxLength`` (and the most any string slot gets).
DEFAULT_STRING = 16
MAX_STRING = 256
#: Positions of an integer / number slot without both bounds.
DEFAULT_INTEGER = 8
DEFAULT_NUMBER = 10
#: Most items an array may lay out.
MAX_ITEMS = 64
#: Most nesting a schema may have (objects and arrays inside each other), and most positions its
#: skeleton may take (an estimate from the schema, checked before anything is laid out).
MAX_DEPTH = 32
MAX_POSITIONS = 8192
#: A slot whose mean entropy (nats) ends above this is resampled by a retry.
RETRY_ENTROPY = 1.0

_COMMON = {"type", "title", "description", "$schema", "$id", "$comment", "examples"}
_ALLOWED = {
    "object": _COMMON | {"properties", "required", "additionalProperties"},
    "string": _COMMON | {"maxLength", "enum"},
    "integer": _COMMON | {"minimum", "maximum"},
    "number": _COMMON | {"minimum", "maximum"},
    "boolean": _COMMON,
    "null": _COMMON,
    "array": _COMMON | {"items", "minItems", "maxItems"},
    "enum": _COMMON | {"enum"},
}
_HINT = ("supported: objects (all properties required, additionalProperties false), strings (maxLength, enum), "
         "integers and numbers (minimum, maximum), booleans, null, arrays (items with minItems/maxItems)")


# -- the schema ---------------------------------------------------------------------------------


def load_schema(text: str, name: str = "the schema") -> dict:
    """Parse and check a schema file's text; anything outside the subset is one :class:`UsageError`."""
    def no_constant(word: str) -> Any:
        raise ValueError(f"{word} is not a JSON number")

    try:
        schema = json.loads(text, parse_constant=no_constant)
    except RecursionError as exc:
        raise UsageError(f"{name} nests deeper than {MAX_DEPTH} levels", _HINT) from exc
    except ValueError as exc:
        raise UsageError(f"{name} is not JSON: {exc}", "give a JSON Schema file") from exc
    check_schema(schema, name)
    return schema


def check_schema(schema: Any, name: str = "the schema", what: str = "--schema") -> None:
    """Raise :class:`UsageError` (one line) unless ``schema`` is a valid schema inside the subset;
    ``name`` names the schema in the message, ``what`` the feature that refuses it."""
    import jsonschema

    if not isinstance(schema, dict):
        raise UsageError(f"{name} must be a JSON object", _HINT)
    # Depth first, without recursion: everything after this (the metaschema check, the walk, the
    # layout) recurses, and a schema nested hundreds deep must be one line, not a RecursionError.
    depth = _depth(schema)
    if depth > MAX_DEPTH:
        raise UsageError(f"{name} nests more than the {MAX_DEPTH} levels {what} lays out", _HINT)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/" + "/".join(str(p) for p in exc.path)
        raise UsageError(f"{name} is not a valid JSON Schema at {where}: {exc.message}".replace("\n", " "),
                         _HINT) from exc
    problems: list[str] = []
    _walk(schema, "", problems)
    if problems:
        raise UsageError(f"{name} uses what {what} does not support: {'; '.join(problems)}", _HINT)
    # Every bound is consistent (checked in the walk), so the skeleton can be sized: refuse one too
    # large to lay out before anything is tokenised.
    positions = _positions(schema)
    if positions > MAX_POSITIONS:
        raise UsageError(f"{name} lays out about {positions:,} positions, more than the {MAX_POSITIONS:,} {what} "
                         "allows", "use fewer or shorter values (maxItems, maxLength, narrower bounds)")


def _depth(root: Any) -> int:
    """How deep ``root``'s objects and arrays nest (iteratively: any depth is safe)."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            return level
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack += [(child, level + 1) for child in children if isinstance(child, (dict, list))]
    return deepest


def _bad_number(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)


def _bounds(node: dict, kind: str) -> tuple[float | None, float | None]:
    """An integer's or number's effective bounds (an integer's rounded inward)."""
    low, high = node.get("minimum"), node.get("maximum")
    if kind == "integer":
        low = math.ceil(low) if low is not None else None
        high = math.floor(high) if high is not None else None
    return low, high


def _positions(node: dict) -> int:
    """About how many canvas positions ``node`` lays out (a bound for refusing huge schemas)."""
    kind = _kind(node)
    if "enum" in node:
        return max((len(json.dumps(v, ensure_ascii=False)) for v in node["enum"]), default=1)
    if kind == "object":
        return 2 + sum(len(key) + 4 + _positions(child) for key, child in node.get("properties", {}).items())
    if kind == "array":
        count = int(node.get("maxItems", node.get("minItems", 0)))
        return 2 + count * (2 + _positions(node["items"])) if count else 2
    if kind == "string":
        return 2 + min(int(node.get("maxLength", DEFAULT_STRING)), DEFAULT_STRING * 4)
    if kind in ("integer", "number"):
        low, high = _bounds(node, kind)
        return max(_digits(low), _digits(high), DEFAULT_NUMBER) + 4
    return 5


def _kind(node: dict) -> str | None:
    kind = node.get("type")
    if isinstance(kind, str):
        return kind
    if kind is None and "enum" in node:
        return "enum"
    return None


def _walk(node: Any, path: str, problems: list[str]) -> None:
    where = path or "/"
    if not isinstance(node, dict):
        problems.append(f"a boolean schema at {where}")
        return
    kind = _kind(node)
    if kind is None:
        if isinstance(node.get("type"), list):
            problems.append(f"a type list at {where}")
        else:
            named = sorted(set(node) - _COMMON)
            problems.append(f"{', '.join(named) or 'a schema with no type'} at {where}")
        return
    extra = sorted(set(node) - _ALLOWED.get(kind, set()))
    if extra:
        problems.append(f"{', '.join(extra)} at {where}")
    if "enum" in node:
        values = node["enum"]
        if not isinstance(values, list) or not values:
            problems.append(f"an empty enum at {where} (no value can match it)")
        elif any(isinstance(v, (dict, list)) for v in values):
            problems.append(f"an enum of objects or arrays at {where}")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in values):
            problems.append(f"an enum with a value that is not a JSON number at {where}")
    if kind in ("integer", "number"):
        named = {key: node[key] for key in ("minimum", "maximum") if key in node}
        bad = [key for key, value in named.items() if _bad_number(value)]
        if bad:
            problems.append(f"{' and '.join(bad)} not a finite number at {where}")
        else:
            low, high = _bounds(node, kind)
            if low is not None and high is not None and low > high:
                what = "no integer lies between" if kind == "integer" and node["minimum"] <= node["maximum"] else ""
                problems.append(f"minimum {node['minimum']} above maximum {node['maximum']} at {where}" if not what
                                else f"{what} minimum {node['minimum']} and maximum {node['maximum']} at {where}")
    if kind == "object":
        properties = node.get("properties", {})
        required = node.get("required", [])
        optional = [key for key in properties if key not in required]
        if optional:
            problems.append(f"optional properties ({', '.join(optional)}) at {where}")
        unknown = [key for key in required if key not in properties]
        if unknown:
            problems.append(f"required properties with no schema ({', '.join(unknown)}) at {where}")
        if node.get("additionalProperties", False) is not False:
            problems.append(f"additionalProperties other than false at {where}")
        for key, child in properties.items():
            _walk(child, f"{path}/{key}", problems)
    elif kind == "array":
        if "items" not in node:
            problems.append(f"an array without items at {where}")
        elif not isinstance(node["items"], dict):
            problems.append(f"items that is not one schema at {where}")
        else:
            _walk(node["items"], f"{path}/0", problems)
        count = node.get("maxItems", node.get("minItems"))
        if "minItems" in node and "maxItems" in node and node["minItems"] > node["maxItems"]:
            problems.append(f"minItems {node['minItems']} above maxItems {node['maxItems']} at {where}")
        if count is None:
            problems.append(f"an array without maxItems at {where}")
        elif count > MAX_ITEMS:
            problems.append(f"more than {MAX_ITEMS} items at {where}")
    elif kind == "string" and node.get("maxLength", 1) > MAX_STRING:
        problems.append(f"maxLength above {MAX_STRING} at {where}")


# -- the skeleton -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """A value the model chooses.

    Attributes:
        path: JSON pointer of the value (``""`` for the root).
        kind: ``"string"``, ``"integer"``, ``"number"`` or ``"enum"`` (booleans are enums).
        length: canvas positions the slot owns.
        options: an enum's values (``()`` otherwise).
        minimum: an integer's or number's lower bound, or ``None``.
        maximum: its upper bound, or ``None``.
        max_length: a string's ``maxLength`` in characters, or ``None``.
    """

    path: str
    kind: str
    length: int
    options: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None


def skeleton(schema: dict) -> tuple[str | Slot, ...]:
    """The schema's output as fixed text and slots, in order (adjacent fixed text merged)."""
    pieces: list[str | Slot] = []
    _emit(schema, "", pieces)
    merged: list[str | Slot] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        elif piece != "":
            merged.append(piece)
    return tuple(merged)


def _digits(bound: float | None) -> int:
    return len(str(abs(int(bound)))) if bound is not None else 0


def _emit(node: dict, path: str, out: list[str | Slot]) -> None:
    kind = _kind(node)
    if "enum" in node:
        out.append(Slot(path, "enum", 0, options=tuple(node["enum"])))
    elif kind == "object":
        out.append("{")
        for i, (key, child) in enumerate(node.get("properties", {}).items()):
            out.append((", " if i else "") + json.dumps(key, ensure_ascii=False) + ": ")
            _emit(child, f"{path}/{key}", out)
        out.append("}")
    elif kind == "array":
        out.append("[")
        for i in range(int(node.get("maxItems", node.get("minItems", 0)))):
            out.append(", " if i else "")
            _emit(node["items"], f"{path}/{i}", out)
        out.append("]")
    elif kind == "string":
        limit = int(node["maxLength"]) if node.get("maxLength") is not None else None
        if limit == 0:
            out.append('""')  # the only string that fits: no slot to choose
        else:
            out += ['"', Slot(path, "string", min(limit, DEFAULT_STRING * 4) if limit is not None else DEFAULT_STRING,
                              max_length=limit), '"']
    elif kind in ("integer", "number"):
        low, high = _bounds(node, kind)
        if low is not None and high is not None:
            # One position per digit of the wider bound (+1 for a sign, +3 for ".dd"): the digit
            # count is bounded by construction, the value itself is clamped on assembly.
            length = max(_digits(low), _digits(high)) + (low < 0) + (3 if kind == "number" else 0)
        else:
            length = DEFAULT_INTEGER if kind == "integer" else DEFAULT_NUMBER
        out.append(Slot(path, kind, max(length, 2), minimum=low, maximum=high))
    elif kind == "boolean":
        out.append(Slot(path, "enum", 0, options=(True, False)))
    elif kind == "null":
        out.append("null")


# -- the layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """Token classes of a vocabulary, from each id's own text.

    Attributes:
        size: ids in the model's vocabulary (the logits' last dimension).
        pad: the filler id (decodes to nothing).
        string: ids a JSON string may contain (no quote, backslash, control character or
            special token).
        digits: ids whose text is one ASCII digit (single digits only, so a slot's positions
            bound its digit count).
        minus: ids whose text is ``-``.
        point: ids whose text is ``.``.
    """

    size: int
    pad: int
    string: tuple[int, ...]
    digits: tuple[int, ...]
    minus: tuple[int, ...]
    point: tuple[int, ...]


def vocabulary(tokenizer: Any, size: int, pad: int) -> Vocabulary:
    """Classify every id by decoding it alone (a few seconds for a 262k vocabulary)."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    known = min(size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(known)])
    string, digits, minus, point = [], [], [], []
    for i, text in enumerate(texts):
        if i in special or i == pad or not text:
            continue
        if not any(c in '"\\' or ord(c) < 0x20 for c in text):
            string.append(i)
        if text.isascii() and text.isdigit() and len(text) == 1:
            digits.append(i)
        elif text == "-":
            minus.append(i)
        elif text == ".":
            point.append(i)
    return Vocabulary(size, pad, tuple(string), tuple(digits), tuple(minus), tuple(point))


@dataclass(frozen=True)
class SchemaLayout:
    """A schema's skeleton laid out on canvases.

    Attributes:
        pieces: the skeleton (fixed text and slots) with each enum slot's length set.
        tokens: per position, the clamped token (pad in slots and after the end),
            ``canvases x canvas_length`` long.
        fixed: per position, whether it is clamped.
        allowed: per position, the ids it may take (``None`` for a clamped position).
        spans: per slot, ``(start, end)`` positions in the generated sequence.
        literals: per slot, each enum option's token ids (``()`` for other slots).
        length: positions the skeleton itself takes.
    """

    pieces: tuple[str | Slot, ...]
    tokens: tuple[int, ...]
    fixed: tuple[bool, ...]
    allowed: tuple[tuple[int, ...] | None, ...]
    spans: tuple[tuple[int, int], ...]
    literals: tuple[tuple[tuple[int, ...], ...], ...]
    length: int

    def tensors(self, vocab_size: int) -> tuple[Any, Any, Any]:
        """``(clamp tokens (1, P), clamp mask (1, P), allowed (1, P, V))`` for the loop."""
        import torch

        allowed = torch.ones((1, len(self.tokens), vocab_size), dtype=torch.bool)
        # A slot's positions share one tuple of ids (a string's holds most of the vocabulary):
        # build each distinct tuple's row once.
        rows: dict[int, torch.Tensor] = {}
        for position, ids in enumerate(self.allowed):
            if ids is not None:
                row = rows.get(id(ids))
                if row is None:
                    row = rows[id(ids)] = torch.zeros(vocab_size, dtype=torch.bool)
                    row[torch.tensor(ids, dtype=torch.long)] = True
                allowed[0, position] = row
        return (torch.tensor([self.tokens], dtype=torch.long), torch.tensor([self.fixed], dtype=torch.bool),
                allowed)


def _slot_positions(slot: Slot, vocab: Vocabulary) -> list[tuple[int, ...]]:
    pad = (vocab.pad,)
    if slot.kind == "string":
        return [vocab.string + pad] * slot.length
    sign = vocab.minus if slot.minimum is None or slot.minimum < 0 else ()
    rest = vocab.digits + (vocab.point if slot.kind == "number" else ()) + pad
    return [vocab.digits + sign + pad, vocab.digits] + [rest] * (slot.length - 2)


def layout(schema: dict, tokenizer: Any, vocab: Vocabulary, canvas_length: int) -> SchemaLayout:
    """Tokenise the skeleton's fixed text, size the enum slots and place everything on whole canvases."""
    pad = vocab.pad
    tokens: list[int] = []
    fixed: list[bool] = []
    allowed: list[tuple[int, ...] | None] = []
    spans: list[tuple[int, int]] = []
    literals: list[tuple[tuple[int, ...], ...]] = []
    pieces: list[str | Slot] = []
    for piece in skeleton(schema):
        if isinstance(piece, str):
            ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
            tokens += ids
            fixed += [True] * len(ids)
            allowed += [None] * len(ids)
            pieces.append(piece)
            continue
        options: tuple[tuple[int, ...], ...] = ()
        if piece.kind == "enum":
            options = tuple(tuple(tokenizer(json.dumps(v, ensure_ascii=False), add_special_tokens=False)["input_ids"])
                            for v in piece.options)
            piece = Slot(piece.path, "enum", max(len(o) for o in options), options=piece.options)
            positions = [tuple(sorted({o[i] if i < len(o) else pad for o in options})) for i in range(piece.length)]
        else:
            if piece.kind in ("integer", "number") and not vocab.digits:
                # Only a schema with numbers needs digit tokens: strings and enums lay out without.
                raise UsageError(f"this tokenizer has no single-digit tokens, so the {piece.kind} at "
                                 f"{piece.path or '/'} cannot be laid out", "use a schema without integers and numbers")
            positions = _slot_positions(piece, vocab)
        spans.append((len(tokens), len(tokens) + piece.length))
        literals.append(options)
        pieces.append(piece)
        tokens += [pad] * piece.length
        fixed += [False] * piece.length
        allowed += positions
    length = len(tokens)
    total = -(-length // canvas_length) * canvas_length
    tokens += [pad] * (total - length)
    fixed += [True] * (total - length)
    allowed += [None] * (total - length)
    return SchemaLayout(tuple(pieces), tuple(tokens), tuple(fixed), tuple(allowed), tuple(spans), tuple(literals),
                        length)


# -- assembling the value -----------------------------------------------------------------------


def render_slot(slot: Slot, ids: Sequence[int], literals: Sequence[Sequence[int]], tokenizer: Any,
                pad: int) -> tuple[Any, str, str | None]:
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
              seeds: Sequence[int] | None, exact: bool | None, compile: bool
              ) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """One generation of every row: per row the committed tokens and last-step entropies, and
    the batch's decoder passes per canvas."""
    import torch

    from diffgen.denoise.loop import CanvasEvent, StepEvent, stream

    vocab_size = int(loaded.model.config.text_config.vocab_size)
    canvas_length = int(loaded.model.config.canvas_length)
    _, _, allowed = plan.tensors(vocab_size)
    clamp = (torch.tensor([list(row) for row in tokens], dtype=torch.long),
             torch.tensor([list(row) for row in fixed], dtype=torch.bool))
    generation = stream(loaded, [list(p) for p in prefixes], settings, observe=True, seeds=seeds, exact=exact,
                        compile=compile, clamp=clamp, allowed=allowed)
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
                  retries: int = 0, exact: bool | None = None, compile: bool = False,
                  vocab: Vocabulary | None = None) -> SchemaResult:
    """Generate a JSON value for ``schema`` after the encoder prefix ``prefix`` (token ids, at least one).

    Each retry (up to ``retries``) re-denoises, with the next seed, every slot whose mean entropy
    is above :data:`RETRY_ENTROPY`, with the skeleton and every other slot clamped to its tokens;
    a slot keeps its new tokens only when their mean entropy is lower.
    """
    return generate_json_rows(loaded, [prefix], schema, settings, retries=retries, exact=exact, compile=compile,
                              vocab=vocab)[0]


def generate_json_rows(loaded: LoadedModel, prefixes: Sequence[Sequence[int]], schema: dict,
                       settings: GenerationSettings, *, seeds: Sequence[int] | None = None, retries: int = 0,
                       exact: bool | None = None, compile: bool = False, vocab: Vocabulary | None = None
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
                                       seeds, exact, compile)
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
                                                   fixed, retry_seeds, exact, compile)
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
