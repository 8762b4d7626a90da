"""A static-address KV cache for the fused passes: one slot per batch row, written in place.

transformers' dynamic cache grows by concatenation, so every canvas moves the tensors the decoder
reads and a CUDA graph recorded for one canvas is useless for the next; and its decoder
concatenates cache and canvas keys at every step. :class:`StaticKV` allocates everything once:

* per layer, ``keys`` / ``values`` ``(slots, kv_heads, region + C, head_dim)``: a cache region of
  ``region`` columns followed by ``C`` canvas columns that each pass writes its canvas's keys and
  values into (no concatenation: attention reads the whole buffer);
* full-attention layers: ``region`` = the capacity (a context bucket); column ``p`` holds the
  row's token at position ``p``;
* sliding-window layers: ``region`` = ``window - 1`` rounded up to a multiple of 16 (or the
  capacity if smaller), a ring buffer: position ``p`` lives in column ``p mod region``. The
  decoder's mask lets the canvas see the last ``window - 1`` positions of it, exactly what
  transformers' dynamic sliding cache keeps, so the decoder sees the same keys (in another column
  order, which attention does not see); the encoder's causal mask applies the window itself;
* ``positions[layer_type]`` ``(slots, region + C)`` int32: the position held by each column, -1
  for an empty one. Masks are built from it on the device (:meth:`decoder_masks`,
  :meth:`encoder_masks`), and canvas positions from ``length`` ``(slots,)``, the tokens each row
  holds: no host value enters a pass, so a pass recorded once as a CUDA graph replays for every
  canvas of every request with the same slot count and bucket.

Each row counts its positions from 0 (padding never moves them), so a row's keys are those it
would have alone, whichever slot or batch it is in. Rows join by :meth:`load_row` (from the
dynamic cache that transformers' encoder filled with the prompt) and leave by :meth:`clear_row`,
with no other row touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import DiffusionGemmaTextConfig, DynamicCache

FULL, SLIDING = "full_attention", "sliding_attention"


def bucket(tokens: int, step: int = 1024) -> int:
    """The capacity (cache columns) for ``tokens``: rounded up to a multiple of ``step``, so that
    generations of similar length share one set of buffers and graphs."""
    return max(step, -(-tokens // step) * step)


class StaticKV:
    """The KV cache of ``slots`` rows with room for ``capacity`` positions each (see the module).

    Attributes:
        slots: rows.
        capacity: positions a row can hold (full-attention layers).
        canvas: canvas length ``C``.
        layer_types: per layer, :data:`FULL` or :data:`SLIDING`.
        region: per layer type, the cache columns before the canvas columns.
        keys, values: per layer, ``(slots, kv_heads, region + C, head_dim)``.
        positions: per layer type, ``(slots, region + C)`` int32, -1 = empty.
        length: ``(slots,)`` int64 on the device, tokens each row holds.
        lengths: the same on the host (the passes never read it).
    """

    def __init__(self, text_config: DiffusionGemmaTextConfig, slots: int, capacity: int, canvas: int,
                 dtype: torch.dtype, device: torch.device):
        self.slots, self.capacity, self.canvas = slots, capacity, canvas
        self.layer_types = list(text_config.layer_types)
        window = getattr(text_config, "sliding_window", None) or capacity + 1
        self.window = window
        # The ring holds at least the last ``window - 1`` positions, rounded up so that attention
        # kernels see an aligned key length; the decoder's mask hides what the window does not keep.
        self.region = {FULL: capacity, SLIDING: min(-(-(window - 1) // 16) * 16, capacity)}
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for index, kind in enumerate(self.layer_types):
            layer = text_config.per_layer_config[index]
            shape = (slots, layer.num_key_value_heads, self.region[kind] + canvas, layer.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
        self.positions = {kind: torch.full((slots, self.region[kind] + canvas), -1, dtype=torch.int32, device=device)
                          for kind in (FULL, SLIDING)}
        self.length = torch.zeros(slots, dtype=torch.long, device=device)
        self.lengths = [0] * slots
        self._offsets = torch.arange(canvas, dtype=torch.long, device=device)
        self._fill = {}  # dtype -> (0, lowest) as 0-d tensors: one ``where`` builds a mask in that dtype

    def _bounds(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._fill:
            device = self.length.device
            self._fill[dtype] = (torch.zeros((), dtype=dtype, device=device),
                                 torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))
        return self._fill[dtype]

    # -- rows joining and leaving (eager, between canvases) -----------------------------------------

    def clear_row(self, slot: int) -> None:
        """Empty ``slot`` (its columns are masked from then on)."""
        for kind in (FULL, SLIDING):
            self.positions[kind][slot].fill_(-1)
        self.length[slot] = 0
        self.lengths[slot] = 0

    def load_row(self, slot: int, cache: DynamicCache, row: int, first: int, length: int) -> None:
        """Copy one row of a dynamic cache into ``slot``.

        ``cache`` is transformers' ``DynamicCache`` after its encoder read a (left-padded) batch:
        row ``row`` holds ``length`` real tokens, at positions ``0..length-1``, in its last
        ``length`` columns (``first`` = the padding before them). Full layers keep every column;
        sliding layers the last ``window - 1`` (transformers' dynamic sliding layer).
        """
        if length > self.capacity:
            raise ValueError(f"{length} tokens do not fit a cache of {self.capacity}")
        self.clear_row(slot)
        for index, (kind, layer) in enumerate(zip(self.layer_types, cache.layers, strict=True)):
            keys, values = layer.keys[row], layer.values[row]
            stored = keys.shape[-2]  # columns the dynamic layer holds (the last ones of the sequence)
            total = first + length
            held_from = total - stored  # sequence column of the first stored column
            start = max(first, held_from)
            if kind == SLIDING:
                start = max(start, total - self.region[SLIDING])
            columns = torch.arange(start - held_from, stored, device=keys.device)
            pos = torch.arange(start - first, length, dtype=torch.long, device=keys.device)
            target = pos if kind == FULL else pos % self.region[SLIDING]
            self.keys[index][slot].index_copy_(1, target, keys.index_select(1, columns).to(self.keys[index].dtype))
            self.values[index][slot].index_copy_(1, target,
                                                 values.index_select(1, columns).to(self.values[index].dtype))
        for kind in (FULL, SLIDING):
            region = self.region[kind]
            start = max(0, length - region)
            pos = torch.arange(start, length, dtype=torch.long, device=self.length.device)
            target = pos if kind == FULL else pos % region
            self.positions[kind][slot].index_copy_(0, target, pos.to(torch.int32))
        self.length[slot] = length
        self.lengths[slot] = length

    def take_rows(self, other: StaticKV) -> None:
        """Hold ``other``'s rows (a larger bucket taking over a smaller one's rows)."""
        for index, kind in enumerate(self.layer_types):
            held = other.region[kind]
            if held > self.region[kind] or (kind == SLIDING and held != self.region[kind] and
                                            max(other.lengths) > held):
                raise ValueError("a smaller cache cannot take these rows")
            for mine, theirs in ((self.keys[index], other.keys[index]), (self.values[index], other.values[index])):
                mine[:, :, :held].copy_(theirs[:, :, :held])
        for kind in (FULL, SLIDING):
            held = other.region[kind]
            self.positions[kind][:, :held].copy_(other.positions[kind][:, :held])
        self.length.copy_(other.length)
        self.lengths = list(other.lengths)

    # -- inside a pass (device only: recordable) ----------------------------------------------------

    def canvas_positions(self) -> torch.Tensor:
        """``(slots, C)`` int64: the positions of each row's canvas (after the tokens it holds)."""
        return self.length[:, None] + self._offsets[None]

    def begin_pass(self) -> torch.Tensor:
        """Mark the canvas columns with the canvas's positions; returns them ``(slots, C)``."""
        positions = self.canvas_positions()
        for kind in (FULL, SLIDING):
            self.positions[kind][:, self.region[kind]:].copy_(positions)
        return positions

    def decoder_masks(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Additive masks ``(slots, 1, C, region + C)``: the canvas attends to every held column
        and to itself, bidirectionally (transformers' diffusion decoder mask)."""
        zero, floor = self._bounds(dtype)
        masks = {}
        for kind, pos in self.positions.items():
            held = pos >= 0
            if kind == SLIDING:  # the ring may hold a little more than the window keeps
                held &= pos >= (self.length[:, None] - (self.window - 1))
            masks[kind] = torch.where(held[:, None, None, :], zero, floor).expand(-1, -1, self.canvas, -1)
        return masks

    def encoder_masks(self, dtype: torch.dtype, query: torch.Tensor) -> dict[str, torch.Tensor]:
        """Additive causal masks ``(slots, 1, C, region + C)`` for queries at positions ``query``
        ``(slots, C)``: held columns at or before the query, within the window on sliding layers."""
        zero, floor = self._bounds(dtype)
        masks = {}
        q = query[:, None, :, None]
        for kind, pos in self.positions.items():
            k = pos[:, None, None, :]
            allowed = (k >= 0) & (k <= q)
            if kind == SLIDING:
                allowed &= (q - k) < self.window
            masks[kind] = torch.where(allowed, zero, floor)
        return masks

    def canvas_slice(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s canvas columns (views the passes write the canvas's keys and values to)."""
        start = self.region[self.layer_types[index]]
        return self.keys[index][:, :, start:], self.values[index][:, :, start:]

    def _targets(self, kind: str) -> tuple[torch.Tensor, slice]:
        """Cache columns ``(slots, n)`` the canvas's last ``n`` tokens go to, and which canvas columns."""
        region = self.region[kind]
        keep = min(self.canvas, region)
        targets = self.canvas_positions()[:, self.canvas - keep:]
        return (targets if kind == FULL else targets % region), slice(self.canvas - keep, self.canvas)

    def commit_layer(self, index: int) -> None:
        """Move layer ``index``'s canvas keys and values into its cache region (after the encoder
        pass of a committed canvas read them)."""
        kind = self.layer_types[index]
        targets, part = self._targets(kind)
        start = self.region[kind]
        for buffer in (self.keys[index], self.values[index]):
            source = buffer[:, :, start + part.start:start + part.stop].clone()
            index_ = targets[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
            buffer.scatter_(2, index_, source)

    def end_encode(self) -> None:
        """After an encoder pass: the canvas's positions are held; every row holds ``C`` more tokens."""
        for kind in (FULL, SLIDING):
            targets, part = self._targets(kind)
            positions = self.canvas_positions()[:, part]
            self.positions[kind].scatter_(1, targets, positions.to(torch.int32))
        self.length.add_(self.canvas)

    def advance_host(self) -> None:
        """The host's copy of :meth:`end_encode`'s length update (a replayed graph runs no Python)."""
        self.lengths = [n + self.canvas for n in self.lengths]

    def fits(self, extra: int) -> bool:
        """Whether every row can hold ``extra`` more tokens."""
        return max(self.lengths) + extra <= self.capacity
