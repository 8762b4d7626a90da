"""Generated token ids -> the answer and the thought channel, as text.

Gemma 4 chat output may open a thought channel before the answer::

    <|channel>thought\\n ...reasoning... <channel|> the answer <turn|>

With thinking off the chat template opens and closes an empty channel in the prompt, so the
output is the answer alone. Thoughts never reach the answer text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
THOUGHT_LABEL = "thought"


@dataclass(frozen=True)
class Response:
    """Attributes: ``text`` the answer; ``thoughts`` the thought channel (``None`` if none opened)."""

    text: str
    thoughts: str | None


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a special token, or ``None`` when the vocabulary lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


def split_response(tokenizer: Any, token_ids: Sequence[int]) -> Response:
    """Split generated ids at the thought channel's markers and decode both parts.

    A channel that opens and never closes (the length ran out while thinking) is all thoughts
    and no answer.
    """
    ids = list(token_ids)
    open_id = _token_id(tokenizer, CHANNEL_OPEN)
    close_id = _token_id(tokenizer, CHANNEL_CLOSE)
    thoughts = None
    if open_id is not None and open_id in ids:
        start = ids.index(open_id)
        end = ids.index(close_id, start) if close_id is not None and close_id in ids[start:] else len(ids)
        thought_text = tokenizer.decode(ids[start + 1 : end], skip_special_tokens=True)
        if thought_text.startswith(THOUGHT_LABEL):
            thought_text = thought_text[len(THOUGHT_LABEL) :]
        thoughts = thought_text.strip()
        ids = ids[:start] + ids[end + 1 :]
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return Response(text=text, thoughts=thoughts)
