"""A conversation's encoder KV cache, kept from one generation to the next (``diffgen chat``).

Each chat turn's prompt is the whole conversation rendered by the chat template. Instead of
encoding all of it again, :class:`PromptCache` keeps the encoder's KV cache of the previous
generation and the token ids it holds (the prompt and every committed canvas but the last: the
loop encodes a canvas only when another one follows). For the next prompt it takes the longest
common prefix of those ids and the new ones, crops the cache to it and lets the loop encode only
the rest. The common-prefix rule is what keeps this correct whatever the template does: past
assistant turns rendered differently from how they were generated (thoughts dropped, the empty
thought channel of the generation prompt gone, text re-tokenised), a changed system prompt or
thinking switch, all simply shorten the prefix that is reused.

Sliding-window layers: a ``DynamicSlidingWindowLayer`` holds only the last ``window - 1``
positions, and transformers' ``DynamicCache.crop`` refuses to crop it once the window is full
(5.17 and 5.24 alike) unless ``activate_past_recording()`` was called, which keeps every past
position in ``layer.keys`` — where the decoder, which reads ``layer.keys`` directly, would attend
to all of them (and 5.17's ``update`` then returns more keys than its mask covers). So this
module keeps each sliding layer's recent keys and values itself (a "history" since the current
turn's reuse point minus a window) and restores the window ending at the crop point from it:
``keys``, ``values`` and ``cumulative_length``, the layer's public attributes on both releases.
Full-attention layers are cropped with ``DynamicLayer.crop``. When the history does not reach back
far enough (the prefix shrank by more than a turn, e.g. after ``/system``), or the cache was left
half-written by an interrupted encode, the cache starts anew: never a wrong reuse, at worst a
full encode. The history costs up to one window plus one turn of sliding-layer keys and values
(for the released model about 200 KB per token in bf16: a few hundred MB at most).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache


@dataclass(frozen=True)
class Reuse:
    """What one generation took from a :class:`PromptCache`.

    Attributes:
        prompt_tokens: tokens in the prompt.
        cached_tokens: tokens the cache held before this generation (0 for a new cache).
        reused_tokens: leading prompt tokens taken from the cache, not encoded again.
        fresh: ``None`` when the cache was reused (possibly cropped), else why it started anew
            (``"empty"``, ``"no common prefix"``, ``"window history too short"``, ``"incomplete"``,
            ``"other model"``).
    """

    prompt_tokens: int
    cached_tokens: int
    reused_tokens: int
    fresh: str | None = None


class PromptCache:
    """The encoder KV cache of one conversation and the token ids it holds.

    Pass it to :func:`~diffgen.denoise.loop.stream` (``cache=``) for every turn; one generation
    at a time, one prompt per generation. :attr:`last` tells what the latest generation reused.
    """

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.ids: list[int] = []
        self.last: Reuse | None = None
        self._owner: tuple[int, str, str] | None = None
        # Per sliding layer: (keys, values, position of their first entry), contiguous up to len(ids).
        self._history: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def clear(self) -> None:
        """Forget the cache (a new conversation)."""
        self.cache, self.ids, self._history, self._owner = None, [], {}, None

    def take(self, model: DiffusionGemmaForBlockDiffusion, prompt: Sequence[int]
             ) -> tuple[DynamicCache | None, int]:
        """The cache to generate ``prompt`` from, cropped to the longest common prefix, and how many
        leading prompt tokens it already holds (at least one token is always left to encode)."""
        prompt = list(prompt)
        owner = (id(model), str(model.device), str(model.dtype))
        common = 0
        for old, new in zip(self.ids, prompt):
            if old != new:
                break
            common += 1
        keep = min(common, len(prompt) - 1)
        cached = len(self.ids)
        reason = None
        if self.cache is None:
            reason = "empty"
        elif owner != self._owner:
            reason = "other model"
        elif not self._complete():
            reason = "incomplete"
        elif keep <= 0:
            reason = "no common prefix"
        elif not self._crop(keep):
            reason = "window history too short"
        if reason is not None:
            from transformers import DynamicCache

            self.clear()
            self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
            # Sliding layers keep every position of an encoder pass until held() cuts them back.
            for layer in self.cache.layers:
                if getattr(layer, "is_sliding", False):
                    layer.activate_past_recording()
            self._owner = owner
            keep = 0
        self.last = Reuse(prompt_tokens=len(prompt), cached_tokens=cached, reused_tokens=keep, fresh=reason)
        self._trim(keep)
        return self.cache, keep

    def held(self, ids: Sequence[int]) -> None:
        """Record that ``ids`` were just encoded into the cache (the loop calls this right after
        every encoder pass, before the decoder reads the cache): move the sliding layers' new keys
        and values into the history, then cut those layers back to their window."""
        ids = list(ids)
        self.ids.extend(ids)
        end, count = len(self.ids), len(ids)
        for index, layer in self._sliding():
            # Recording, the layer kept every position of this pass: [end - len, end).
            keys, values = layer.keys, layer.values
            layer.crop(0)  # back to the last window - 1 positions, as an unrecorded update leaves it
            old = self._history.get(index)
            if old is not None and old[2] + old[0].shape[-2] == end - count:
                self._history[index] = (torch.cat([old[0], keys[..., -count:, :]], dim=-2),
                                        torch.cat([old[1], values[..., -count:, :]], dim=-2), old[2])
            else:
                self._history[index] = (keys, values, end - keys.shape[-2])

    # -- internals -------------------------------------------------------------------------

    def _sliding(self) -> list[tuple[int, Any]]:
        return [(index, layer) for index, layer in enumerate(self.cache.layers)
                if getattr(layer, "is_sliding", False) and getattr(layer, "is_initialized", False)]

    def _complete(self) -> bool:
        """Every layer holds exactly :attr:`ids` (an encode interrupted half-way leaves some layers
        longer than the others)."""
        length = len(self.ids)
        for layer in self.cache.layers:
            if layer.get_seq_length() != length:
                return False
            if getattr(layer, "is_initialized", False) and layer.keys.shape[-2] != layer.values.shape[-2]:
                return False
        return all(start + keys.shape[-2] == length for keys, _, start in self._history.values())

    def _crop(self, keep: int) -> bool:
        """Crop every layer to the first ``keep`` positions; ``False`` (nothing changed) when a
        sliding layer's history does not hold the window that ends there."""
        remove = len(self.ids) - keep
        if remove == 0:
            return True
        sliding = self._sliding()
        windows = {}
        for index, layer in sliding:
            history = self._history.get(index)
            first = max(0, keep - (layer.sliding_window - 1))
            if history is None or history[2] > first:
                return False
            windows[index] = (first - history[2], keep - history[2])
        for index, layer in enumerate(self.cache.layers):
            if index in windows:
                keys, values, _ = self._history[index]
                start, stop = windows[index]
                layer.keys, layer.values = keys[..., start:stop, :], values[..., start:stop, :]
                layer.cumulative_length = keep
            else:
                layer.crop(-remove)
        del self.ids[keep:]
        for index, (keys, values, start) in list(self._history.items()):
            self._history[index] = (keys[..., : keep - start, :], values[..., : keep - start, :], start)
        return True

    def _trim(self, keep: int) -> None:
        """Drop history the next turns will not need: before a window ahead of this turn's reuse
        point (a later turn that goes back further starts anew)."""
        if self.cache is None:
            return
        for index, layer in self._sliding():
            history = self._history.get(index)
            if history is None:
                continue
            keys, values, start = history
            first = max(0, keep - (layer.sliding_window - 1))
            if first > start:
                self._history[index] = (keys[..., first - start:, :].clone(), values[..., first - start:, :].clone(),
                                        first)
