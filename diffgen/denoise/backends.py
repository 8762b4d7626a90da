"""Where a canvas's keys and values live, and the passes that read and write them.

The canvas runner (:mod:`diffgen.denoise.runner`) steps canvases over one of two backends with one
interface (``slots``, ``static``, :meth:`decoder`, :meth:`run_encoder`, :meth:`begin_canvas`):

* :class:`StaticBackend` — the fast path: diffgen's fused layers (:mod:`diffgen.denoise.fused`)
  over a :class:`~diffgen.denoise.kv.StaticKV`, one slot per row. Its decoder and encoder passes
  read every changing value from the device, so they are the same callables for every canvas
  (``static``): the runner records each as a CUDA graph once per process and replays it for every
  canvas of every generation with the same slot count, context bucket and settings. Prompts are
  prefilled by transformers' encoder (images included) into a dynamic cache, then copied into
  their slots (:meth:`StaticBackend.load`), each row's positions counted from 0.
  A chat's :class:`~diffgen.denoise.prompt_cache.PromptCache` serves the prefill: only the part
  of the prompt it does not hold is encoded, and it keeps the prompt for the next turn.
* :class:`DynamicBackend` — transformers' own encoder and decoder over its ``DynamicCache``: the
  exact path (token-identical to ``generate()``: same positions, masks and cache; with a prompt
  cache it also keeps the committed canvases), and ``DIFFGEN_FUSED=0`` for comparison. Its
  decoder is bound to one canvas's cache, mask and positions (not static).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    from diffgen.denoise.prompt_cache import PromptCache
    from diffgen.loading.loader import LoadedModel


def cache_keyword(model) -> str:
    """The name under which this transformers release passes the KV cache to the model.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is deprecated
    until 5.40); diffgen supports releases on both sides of the rename.
    """
    # The class's forward: an instance's may be wrapped (accelerate hooks, tests) as (*args, **kwargs).
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def run_encoder(model, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache,
           cache_kw: str | None = None, *, vision: dict[str, torch.Tensor] | None = None) -> None:
    """Run transformers' encoder over ``ids`` ``(B, L)``, appending their keys and values to ``cache``.

    ``attention_mask`` ``(B, cached + L)`` bool marks real tokens (False: left padding);
    ``positions`` ``(1 or B, L)`` are the tokens' position ids. ``vision``: a prompt's image inputs
    (first encoder pass only: ``pixel_values``, ``image_position_ids``, ``mm_token_type_ids``), passed
    as transformers' ``generate()`` passes them to its first encoder call.
    """
    cache_kw = cache_kw or cache_keyword(model)
    ids = ids.clone(memory_format=torch.contiguous_format)
    mask = model.model.encoder.create_masks_for_generate(
        config=model.config,
        inputs_embeds=torch.empty((ids.shape[0], ids.shape[1], 0), dtype=model.dtype, device=ids.device),
        attention_mask=attention_mask,
        position_ids=positions,
        **{cache_kw: cache},
        **({"mm_token_type_ids": vision["mm_token_type_ids"]} if vision else {}),
    )
    model.model.encoder(input_ids=ids, attention_mask=mask, position_ids=positions, **{cache_kw: cache},
                        **(vision or {}))


def row_positions(lengths: Sequence[int], total: int, width: int, device: torch.device) -> torch.Tensor:
    """Per-row position ids ``(B, width)`` int32 of the last ``width`` columns of a ``total``-column
    left-padded sequence whose row ``r`` holds ``lengths[r]`` real tokens (padding gets 0)."""
    first = torch.tensor([length - total for length in lengths], dtype=torch.int32, device=device)
    columns = torch.arange(total - width, total, dtype=torch.int32, device=device)
    return (first[:, None] + columns[None]).clamp_(min=0)


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device, total: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``(B, total)``: the prompts left-padded with ``pad`` to ``total`` columns
    (default: the longest), and which columns are real tokens."""
    total = total or max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (total - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[False] * (total - len(p)) + [True] * len(p) for p in prompts], dtype=torch.bool,
                        device=device)
    return ids, mask


class Decoder:
    """transformers' decoder pass of one canvas: canvas tokens (+ self-conditioning) -> raw logits.

    Calls the decoder and the lm_head directly (what ``model(...)`` does, minus the fp32
    soft-capped logits it would materialise: the sampler soft-caps on the way), with the
    cache, mask and positions of the canvas bound once.
    """

    def __init__(self, model: DiffusionGemmaForBlockDiffusion, cache: DynamicCache,
                 mask: torch.Tensor | dict[str, torch.Tensor], positions: torch.Tensor, cache_kw: str):
        self.model = model
        self.kwargs = {cache_kw: cache, "decoder_attention_mask": mask, "decoder_position_ids": positions}

    def __call__(self, canvas: torch.Tensor, self_conditioning: torch.Tensor | None,
                 self_conditioning_mask: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if self_conditioning_mask is None else {"self_conditioning_mask": self_conditioning_mask}
        hidden = self.model.model.decoder(decoder_input_ids=canvas, self_conditioning_logits=self_conditioning,
                                          **extra, **self.kwargs)
        return self.model.lm_head(hidden.last_hidden_state)


class StaticBackend:
    """Fused passes over a static-address KV cache of ``slots`` rows (see the module's docstring)."""

    static = True

    def __init__(self, loaded: LoadedModel, slots: int, capacity: int):
        from diffgen.denoise.fused import prepare
        from diffgen.denoise.kv import StaticKV

        model = loaded.model
        self.loaded = loaded
        self.slots = slots
        self.canvas_length = int(model.config.canvas_length)
        self.fused = prepare(model)
        self.kv = StaticKV(model.config.get_text_config(), slots, capacity, self.canvas_length, self.fused.dtype,
                           model.device)
        self.tokens = torch.zeros((slots, self.canvas_length), dtype=torch.long, device=model.device)
        self._cache_kw = cache_keyword(model)

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    def load(self, prompts: Sequence[Sequence[int]], slots: Sequence[int], pad: int,
             vision: dict[str, torch.Tensor] | None = None, prompt_cache: PromptCache | None = None) -> None:
        """Prefill ``prompts`` (one per slot in ``slots``) with transformers' encoder, left-padded
        together, each row's positions from 0, and copy each row's keys and values into its slot.

        ``prompt_cache`` (one text prompt): a conversation's cache; only what it does not hold of
        the prompt is encoded, and it keeps the prompt (the canvases live in the static cache).
        """
        from transformers import DynamicCache

        model = self.loaded.model
        ids, mask = left_pad(prompts, pad, model.device)
        lengths = [len(p) for p in prompts]
        positions = row_positions(lengths, ids.shape[1], ids.shape[1], model.device)
        if len(set(lengths)) == 1:
            positions = positions[:1]
        reused = 0
        if prompt_cache is not None:
            cache, reused = prompt_cache.take(model, list(prompts[0]))
        else:
            cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        run_encoder(model, ids[:, reused:], mask, positions[:, reused:], cache, self._cache_kw, vision=vision)
        if prompt_cache is not None:
            prompt_cache.held(ids[0, reused:].tolist())
        for row, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
            self.kv.load_row(slot, cache, row, ids.shape[1] - length, length)

    def clear(self, slot: int) -> None:
        self.kv.clear_row(slot)

    def decoder(self):
        from diffgen.denoise import fused

        return lambda canvas, sc, mask=None: fused.decode(self.fused, self.kv, canvas, sc, mask)

    def encoder_pass(self) -> None:
        """The encoder pass of the committed canvas in :attr:`tokens` (recordable)."""
        from diffgen.denoise import fused

        fused.run_encoder(self.fused, self.kv, self.tokens)

    def begin_canvas(self) -> None:
        pass

    def fits(self, extra: int) -> bool:
        return self.kv.fits(extra)


class DynamicBackend:
    """transformers' encoder and decoder over its ``DynamicCache`` (see the module's docstring):
    the loop's batch, left-padded, positions counted from the first column as ``generate()`` does."""

    static = False

    def __init__(self, loaded: LoadedModel, prompts: Sequence[Sequence[int]], pad: int,
                 prompt_cache: PromptCache | None = None):
        from transformers import DynamicCache

        model = loaded.model
        self.loaded = loaded
        self.slots = len(prompts)
        self.canvas_length = int(model.config.canvas_length)
        self.prompt_cache = prompt_cache
        device = model.device
        self.input_ids, self.attention_mask = left_pad(prompts, pad, device)
        if prompt_cache is not None:  # a conversation's cache: the prompt's common prefix is already encoded
            self.cache, self.reused = prompt_cache.take(model, list(prompts[0]))
        else:
            self.cache, self.reused = DynamicCache(config=model.config.get_text_config(decoder=True)), 0
        self._cache_kw = cache_keyword(model)
        self.length = self.input_ids.shape[1]
        self._decoder_attention_mask = torch.nn.functional.pad(self.attention_mask, (0, self.canvas_length),
                                                               value=True)

    def _positions(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, dtype=torch.int32, device=self.input_ids.device)[None]

    def _run_encoder(self, ids: torch.Tensor, positions: torch.Tensor, vision: dict | None = None) -> None:
        run_encoder(self.loaded.model, ids, self.attention_mask, positions, self.cache, self._cache_kw, vision=vision)
        if self.prompt_cache is not None:
            self.prompt_cache.held(ids[0].tolist())

    def prefill(self, vision: dict[str, torch.Tensor] | None = None) -> None:
        """Encode the prompts (what the cache does not hold yet)."""
        self._run_encoder(self.input_ids[:, self.reused:], self._positions(self.reused, self.length), vision)

    def run_encoder(self, tokens: torch.Tensor) -> None:
        """Append a committed canvas ``(B, C)`` to the cache."""
        width = tokens.shape[1]
        self.attention_mask = torch.nn.functional.pad(self.attention_mask, (0, width), value=True)
        self._run_encoder(tokens, self._positions(self.length, self.length + width))
        self.length += width
        self._decoder_attention_mask = torch.nn.functional.pad(self.attention_mask, (0, self.canvas_length),
                                                               value=True)

    def decoder(self):
        model = self.loaded.model
        probe = torch.zeros((self.slots, self.canvas_length, 1), dtype=torch.long, device=self.input_ids.device)
        mask = model.model.decoder.create_diffusion_decoder_attention_mask(
            model.config, probe, self.cache, self._decoder_attention_mask)
        return Decoder(model, self.cache, mask, self._positions(self.length, self.length + self.canvas_length),
                       self._cache_kw)

    def begin_canvas(self) -> None:
        pass
