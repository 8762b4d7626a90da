"""Generated token ids -> the answer and the thought channel, as text.

Gemma 4 chat output may open a thought channel before the answer::

    <|channel>thought\\n ...reasoning... <channel|> the answer <turn|>

With thinking off the chat template opens and closes an empty channel in the prompt, so the
output is the answer alone. Thoughts never reach the answer text.

:func:`route` is the one place that decides which token belongs where; the answer text here,
the live view (:mod:`diffgen.ui.view`) and the picture (:mod:`diffgen.ui.picture`) all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
THOUGHT_LABEL = "thought"
THOUGHT = "thought"
ANSWER = "answer"


def route(token_ids: Sequence[int], channel_ids: Sequence[int] | None,
          settled: Sequence[bool] | None = None) -> list[str | None]:
    """Per position: :data:`THOUGHT`, :data:`ANSWER`, or ``None`` for a channel marker itself.

    Every opener starts thoughts and every closer ends them; a channel that never closes is
    thoughts to the end. ``channel_ids`` is ``(open id, close id)`` (``None``: no channel in this
    vocabulary). ``settled``: positions still noise (``False``) never count as markers.
    """
    opener, closer = tuple(channel_ids) if channel_ids else (None, None)
    where, out = ANSWER, []
    for index, token in enumerate(token_ids):
        marker = settled is None or settled[index]
        if marker and opener is not None and token == opener:
            where = THOUGHT
            out.append(None)
        elif marker and closer is not None and token == closer:
            where = ANSWER
            out.append(None)
        else:
            out.append(where)
    return out


def label_length(thoughts: str) -> int:
    """How many leading characters of a thought text are the channel's ``thought`` label."""
    return len(THOUGHT_LABEL) if thoughts.startswith(THOUGHT_LABEL) else 0


@dataclass(frozen=True)
class Response:
    """Attributes: ``text`` the answer; ``thoughts`` the thought channel (``None`` if none opened)."""

    text: str
    thoughts: str | None


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of a special token, or ``None`` when the vocabulary lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


def split_response(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> Response:
    """Split generated ids at the thought channel's markers and decode both parts.

    A channel that opens and never closes (the length ran out while thinking) is all thoughts
    and no answer.
    """
    ids = list(token_ids)
    open_id = _token_id(tokenizer, CHANNEL_OPEN)
    close_id = _token_id(tokenizer, CHANNEL_CLOSE)
    where = route(ids, (open_id, close_id) if open_id is not None else None)
    answer = [token for token, part in zip(ids, where) if part == ANSWER]
    thoughts = None
    if open_id is not None and open_id in ids:
        thought_text = tokenizer.decode([t for t, part in zip(ids, where) if part == THOUGHT], skip_special_tokens=True)
        thoughts = thought_text[label_length(thought_text):].strip()
    text = tokenizer.decode(answer, skip_special_tokens=True).strip()
    return Response(text=text, thoughts=thoughts)
