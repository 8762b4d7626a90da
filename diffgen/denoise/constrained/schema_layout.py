"""A schema's skeleton (fixed text and value slots) laid out on whole canvases.

:func:`skeleton` turns a checked schema into fixed text and :class:`Slot` s in output order;
:func:`layout` tokenises the fixed text, sizes the enum slots and gives every position its
clamped token or its allowed vocabulary (:class:`SchemaLayout`), which the loop reads as a clamp
and an allowed-token mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffgen.denoise.constrained.schema_check import (DEFAULT_INTEGER, DEFAULT_NUMBER, DEFAULT_STRING, bounds, digits,
                                                      kind_of)
from diffgen.denoise.constrained.schema_vocab import Vocabulary
from diffgen.errors import UsageError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


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


def _emit(node: dict, path: str, out: list[str | Slot]) -> None:
    kind = kind_of(node)
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
        low, high = bounds(node, kind)
        if low is not None and high is not None:
            # One position per digit of the wider bound (+1 for a sign, +3 for ".dd"): the digit
            # count is bounded by construction, the value itself is clamped on assembly.
            length = max(digits(low), digits(high)) + (low < 0) + (3 if kind == "number" else 0)
        else:
            length = DEFAULT_INTEGER if kind == "integer" else DEFAULT_NUMBER
        out.append(Slot(path, kind, max(length, 2), minimum=low, maximum=high))
    elif kind == "boolean":
        out.append(Slot(path, "enum", 0, options=(True, False)))
    elif kind == "null":
        out.append("null")



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

    def tensors(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def layout(schema: dict, tokenizer: PreTrainedTokenizerBase, vocab: Vocabulary, canvas_length: int) -> SchemaLayout:
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

