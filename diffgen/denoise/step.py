"""One denoising step as a pure function of tensors: ``denoise_step(state, context) -> state``.

The canvas runner (:mod:`diffgen.denoise.runner`) owns everything that needs the host: when a
canvas starts, when to ask whether every row has stopped, recording and replaying graphs. The
step owns the arithmetic of one decoder pass and nothing else:

1. the decoder reads the canvas (and the previous step's scaled logits for self-conditioning)
   and the lm_head gives raw logits;
2. the sampler soft-caps, divides by the step's temperature, samples, takes the argmax and the
   per-token entropy (:mod:`diffgen.denoise.sampling`);
3. entropy-bound acceptance keeps the confident tokens, the rest are renoised;
4. rows that stopped earlier keep their state; the adaptive-stop history advances.

Every tensor in :class:`StepState` has a shape fixed for the whole canvas and every input the
step reads lives on the device (the temperature schedule is a device vector indexed by a
device step counter), so on CUDA one step can be recorded once as a CUDA graph and replayed
(:class:`~diffgen.denoise.runner.StepGraph`). The exact sampler draws from torch's global generator in the
reference's order and stays eager; the fast sampler's noise is counter-based, a pure function
of (row seed, canvas, step), so replays need no re-seeding and a row's draws never depend on
its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffgen.denoise.sampling import ExactSampler, FastSampler

STATE_FIELDS_OUT = ("canvas", "draft", "self_conditioning", "stopped", "history", "step", "forwards",
                    "accepted", "entropy", "mean_entropy")


@dataclass(frozen=True)
class StepState:
    """The state between two denoising steps of one canvas (all tensors on the model's device).

    Attributes:
        canvas: ``(B, C)`` int64, the tokens the next decoder pass reads.
        draft: ``(B, C)`` int64, the argmax of the last step's scaled logits (what the canvas would commit to).
        self_conditioning: ``(B, C, V)`` in the embedding dtype, the last step's temperature-
            scaled logits, or ``None`` before the first step of a canvas.
        stopped: ``(B,)`` bool, rows whose adaptive stop fired on this canvas.
        history: ``(S, B, C)`` int64, the last ``S`` drafts (``S`` = the stability window; -1 =
            none yet), or ``None`` when adaptive stopping is off or ``S`` is 0.
        step: 0-d int64, steps done on this canvas.
        forwards: ``(B,)`` int32, decoder passes each row has taken part in, all canvases.
        accepted: ``(B, C)`` bool, positions accepted at the last step.
        entropy: ``(B, C)`` float32, per-token entropy (nats) at the last step.
        mean_entropy: ``(B,)`` float32, mean of ``entropy`` over the canvas.
    """

    canvas: torch.Tensor
    draft: torch.Tensor
    self_conditioning: torch.Tensor | None
    stopped: torch.Tensor
    history: torch.Tensor | None
    step: torch.Tensor
    forwards: torch.Tensor
    accepted: torch.Tensor
    entropy: torch.Tensor
    mean_entropy: torch.Tensor


@dataclass(frozen=True)
class StepContext:
    """What one canvas's steps read and never write.

    Attributes:
        decoder: ``(canvas, self_conditioning | None, self_conditioning_mask | None) -> raw
            logits (B, C, V)``, the lm_head output before soft-capping (:class:`Decoder`).
        sampler: an exact or fast sampler (:mod:`diffgen.denoise.sampling`).
        temperatures: ``(N,)`` float32 on the device: the temperature of step k (0-based) at
            index k.
        accept: entropy-bound acceptance, ``(B, C) entropy -> (B, C) bool``.
        stability_window: steps the adaptive stop needs the draft unchanged for
            (:attr:`~diffgen.settings.GenerationSettings.stability_window`), or ``None`` when stopping is off.
        confidence_threshold: adaptive stop's mean-entropy threshold (nats), or ``None``.
        finished: ``(B,)`` bool, rows that ended in an earlier canvas.
        canvas_index: 0-d int64 on the device, the canvas being denoised.
        embed_dtype: dtype of the self-conditioning logits the decoder reads.
        clamp_tokens: ``(B, C)`` int64 on the device, the token each clamped position must
            hold (any value where ``clamp_mask`` is False), or ``None``: nothing clamped.
        clamp_mask: ``(B, C)`` bool on the device, the clamped (fixed) positions, or ``None``.
        allowed: ``(B, C, V)`` (or ``(1, C, V)``, broadcast over rows) bool on the device, the
            tokens each position may take, or ``None``: no restriction (the step is unchanged).
            Every position needs at least one allowed token.

    Clamping (infilling, :mod:`diffgen.denoise.constrained.fill`): the model has no mask token and
    re-decides every position at every step, so a fixed position is pinned at every step, not
    seeded once. After the sampler's draw a clamped position's sample and argmax are its token
    and its entropy is exactly 0 (so entropy-bound acceptance always keeps it and it adds
    nothing to the cumulative bound or to the mean entropy's sum), its self-conditioning
    logits become one-hot (``0`` at the token, the dtype's lowest value elsewhere: softmax
    gives exactly the token's embedding), and the canvas after renoising holds the token. The
    override comes after the draw rather than in the logits, so it is the same for the exact
    sampler, the fast torch tail and the Triton kernel, and the random draws keep their order.

    Allowed vocabularies (JSON by construction, :mod:`diffgen.denoise.constrained.schema`) act before
    temperature and sampling: the raw logits are soft-capped here, every token outside a
    position's allowed set is set to :data:`MASKED_LOGIT`, and the sampler is told the logits
    are already capped (``capped=True``), so it divides by the temperature and draws as usual.
    A finite floor rather than ``-inf``: the soft cap would map ``-inf`` back to ``-cap``, and a
    finite floor keeps ``0 x log 0`` terms of the fused kernel's entropy at 0 instead of NaN;
    ``exp(MASKED_LOGIT / T - max)`` is exactly 0 in float32 and no Gumbel draw (bounded by
    about 45 from 32-bit uniforms) lifts a masked token over an allowed one.
    """

    decoder: Callable[..., torch.Tensor]
    sampler: ExactSampler | FastSampler
    temperatures: torch.Tensor
    accept: Callable[[torch.Tensor], torch.Tensor]
    stability_window: int | None
    confidence_threshold: float | None
    finished: torch.Tensor
    canvas_index: torch.Tensor
    embed_dtype: torch.dtype
    clamp_tokens: torch.Tensor | None = None
    clamp_mask: torch.Tensor | None = None
    allowed: torch.Tensor | None = None


#: The logit (after soft-capping, before temperature) of a token outside a position's allowed set.
MASKED_LOGIT = -1.0e9


def restrict(raw: torch.Tensor, allowed: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Soft-capped float32 logits with every token outside ``allowed`` at :data:`MASKED_LOGIT`."""
    from diffgen.denoise.sampling import soft_cap

    return soft_cap(raw, softcap).masked_fill(~allowed, MASKED_LOGIT)


def clamp(tokens: torch.Tensor, context: StepContext) -> torch.Tensor:
    """``tokens`` ``(B, C)`` with the context's clamped positions set to their tokens."""
    if context.clamp_mask is None:
        return tokens
    return torch.where(context.clamp_mask, context.clamp_tokens, tokens)


def _clamp_draw(sampled: torch.Tensor, draft: torch.Tensor, entropy: torch.Tensor, scaled: torch.Tensor,
                context: StepContext) -> tuple[torch.Tensor, ...]:
    """The sampler's outputs with clamped positions fixed: token, token, entropy 0, one-hot logits."""
    mask, tokens = context.clamp_mask, context.clamp_tokens
    sampled = torch.where(mask, tokens, sampled)
    draft = torch.where(mask, tokens, draft)
    entropy = torch.where(mask, torch.zeros_like(entropy), entropy)
    floor = torch.finfo(scaled.dtype).min
    index = tokens.unsqueeze(-1)
    at_token = torch.where(mask.unsqueeze(-1), torch.zeros_like(index, dtype=scaled.dtype),
                           scaled.gather(-1, index))
    scaled = scaled.masked_fill(mask.unsqueeze(-1), floor).scatter(-1, index, at_token)
    return sampled, draft, entropy, scaled


def initial_state(context: StepContext, canvas: torch.Tensor, forwards: torch.Tensor) -> StepState:
    """The state before the first step of a canvas whose starting tokens are ``canvas``."""
    batch, length = canvas.shape
    device = canvas.device
    history = None
    if context.stability_window:
        history = torch.full((context.stability_window, batch, length), -1, dtype=canvas.dtype, device=device)
    canvas = clamp(canvas, context)
    return StepState(
        canvas=canvas,
        draft=canvas,
        self_conditioning=None,
        stopped=torch.zeros(batch, dtype=torch.bool, device=device),
        history=history,
        step=torch.zeros((), dtype=torch.long, device=device),
        forwards=forwards,
        accepted=torch.zeros((batch, length), dtype=torch.bool, device=device),
        entropy=torch.zeros((batch, length), dtype=torch.float32, device=device),
        mean_entropy=torch.zeros(batch, dtype=torch.float32, device=device),
    )


def denoise_step(state: StepState, context: StepContext, *, self_conditioning_mask: torch.Tensor | None = None
                 ) -> StepState:
    """One denoising step; returns the next state and changes nothing in place.

    ``self_conditioning_mask`` (``(B,)`` bool) lets a captured graph run the first step of a
    canvas with a placeholder self-conditioning tensor that the mask zeroes, exactly as the
    reference's ``None``.
    """
    sampler = context.sampler
    active = ~(state.stopped | context.finished)
    raw = context.decoder(state.canvas, state.self_conditioning, self_conditioning_mask)
    temperature = context.temperatures.index_select(0, state.step.view(1)).squeeze(0)
    step = state.step + 1
    if context.allowed is None:
        sampled, draft, entropy, scaled = sampler.draw(raw, temperature, active=active,
                                                        canvas=context.canvas_index, step=step,
                                                        out_dtype=context.embed_dtype)
    else:
        sampled, draft, entropy, scaled = sampler.draw(restrict(raw, context.allowed, sampler.softcap),
                                                        temperature, active=active, canvas=context.canvas_index,
                                                        step=step, out_dtype=context.embed_dtype, capped=True)
    if context.clamp_mask is not None:
        sampled, draft, entropy, scaled = _clamp_draw(sampled, draft, entropy, scaled, context)
    accepted = context.accept(entropy)
    canvas = sampler.renoise(torch.where(accepted, sampled, state.canvas), accepted, active=active,
                             canvas=context.canvas_index, step=step)
    canvas = clamp(canvas, context)
    mean_entropy = entropy.mean(dim=-1)
    stopped, history = state.stopped, state.history
    if context.stability_window is not None:
        if state.self_conditioning is not None:
            # Rows that stopped earlier keep their canvas, draft and logits.
            keep = state.stopped
            draft = torch.where(keep[:, None], state.draft, draft)
            canvas = torch.where(keep[:, None], state.canvas, canvas)
            scaled = torch.where(keep[:, None, None], state.self_conditioning, scaled)
        if history is None:
            stable = torch.ones_like(stopped)
        else:
            stable = (history == draft[None]).all(dim=-1).all(dim=0)
            history = torch.cat([history[1:], draft[None]], dim=0)
        stopped = stopped | (stable & (mean_entropy < context.confidence_threshold))
    return StepState(canvas=canvas, draft=draft, self_conditioning=scaled, stopped=stopped, history=history,
                     step=step, forwards=state.forwards + active, accepted=accepted, entropy=entropy,
                     mean_entropy=mean_entropy)


_COMPILED: dict[str, Callable[[StepState, StepContext], StepState]] = {}


def compiled_step() -> Callable[[StepState, StepContext], StepState]:
    """:func:`denoise_step` through ``torch.compile`` (one per process and backend).

    The first call of each canvas shape compiles (a minute or more for a small model on a
    CPU); inductor caches the generated kernels on disk (``TORCHINDUCTOR_CACHE_DIR``), so a
    second process mostly re-traces. ``DIFFGEN_COMPILE_BACKEND`` picks another backend
    (``eager`` traces without generating code: the tests use it).
    """
    import os

    backend = os.environ.get("DIFFGEN_COMPILE_BACKEND", "inductor")
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(denoise_step, backend=backend)
    return _COMPILED[backend]


def clone_state(state: StepState) -> StepState:
    """A copy whose tensors a later replay cannot overwrite (for events a consumer may keep)."""
    return replace(state, **{f.name: getattr(state, f.name).clone() for f in fields(StepState)
                             if getattr(state, f.name) is not None})
