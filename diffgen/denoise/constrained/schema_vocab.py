"""Token classes of a vocabulary (string-safe ids, single digits, minus, point), for the schema's value slots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


def vocabulary(tokenizer: PreTrainedTokenizerBase, size: int, pad: int) -> Vocabulary:
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
