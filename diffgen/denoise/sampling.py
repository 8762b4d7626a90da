"""The sampler's policies, each a small callable built by a factory.

Every function here reproduces transformers' reference formulas operation for operation
(``DiffusionGemmaGenerationMixin`` in transformers 5.23), because the exactness contract —
the same tokens as ``model.generate()`` for the same seed — depends on bit-identical floats
and on drawing random numbers in the same order:

1. ``randint`` for the initial canvas,
2. per step: ``multinomial`` over every canvas position, then ``randint`` for renoising.

:class:`GlobalNoise` owns those draws, so another source can replace it without touching the
loop: :class:`PerRowNoise` gives every row its own seeded generator and draws only for rows
still denoising, so a row's tokens depend on its own seed and not on its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TemperatureSchedule:
    """Linear temperature ``t_min + (t_max - t_min) * n / N`` at remaining-step ``n`` (N..1).

    Attributes:
        t_min: temperature at the last step (n = 1 reaches t_min + (t_max - t_min) / N).
        t_max: temperature at the first step (n = N).
        max_steps: N.
    """

    t_min: float
    t_max: float
    max_steps: int

    def __call__(self, remaining: torch.Tensor) -> torch.Tensor:
        """The temperature as a 0-d float32 tensor; ``remaining`` is an int32 0-d tensor.

        Computed exactly as the reference does (int32 / int promotes to float32), so dividing
        logits by it gives the reference's bits.
        """
        return self.t_min + ((self.t_max - self.t_min) * (remaining / self.max_steps))

    def value(self, remaining: int) -> float:
        """The same temperature as a Python float, for display (no device round trip)."""
        return self.t_min + (self.t_max - self.t_min) * remaining / self.max_steps


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each position's softmax, shape ``logits.shape[:-1]``.

    Same arithmetic as ``torch.distributions.Categorical(logits=logits).entropy()`` (which the
    reference calls), without its argument validation and its device sync.
    """
    normalized = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(normalized, dim=-1)
    clamped = torch.clamp(normalized, min=torch.finfo(normalized.dtype).min)
    return -(clamped * probs).sum(-1)


def entropy_bound_acceptance(entropy_bound: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build the entropy-bound acceptance rule (https://arxiv.org/abs/2505.24857).

    The returned callable takes per-token entropies ``(B, C)`` and returns the accepted mask
    ``(B, C)``: sort ascending, accept while ``cumsum(H) - H_i <= entropy_bound``. The
    lowest-entropy token is always accepted (its left side is 0).
    """

    def accept(entropy: torch.Tensor) -> torch.Tensor:
        sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
        cumulative = torch.cumsum(sorted_entropy, dim=-1)
        sorted_mask = cumulative - sorted_entropy <= entropy_bound
        return torch.scatter(torch.zeros_like(sorted_mask), dim=-1, index=order, src=sorted_mask)

    return accept


class GlobalNoise:
    """Random draws from torch's global RNG on ``device``, in the reference's order, for every
    row whether it is still denoising or not (``active`` is ignored), as ``generate()`` does.

    Attributes:
        vocab_size: tokens are drawn uniformly from ``[0, vocab_size)``.
        canvas_length: positions per canvas.
    """

    per_row = False

    def __init__(self, vocab_size: int, canvas_length: int, device: torch.device):
        self.vocab_size = vocab_size
        self.canvas_length = canvas_length
        self.device = device

    def uniform_canvas(self, batch_size: int, active: torch.Tensor | None = None) -> torch.Tensor:
        """A canvas of uniformly random tokens, ``(B, C)`` int64."""
        return torch.randint(0, self.vocab_size, (batch_size, self.canvas_length), device=self.device)

    def sample(self, probs: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """One token per position from ``probs`` ``(B, C, V)`` float32, ``(B, C)`` int64."""
        batch, canvas, vocab = probs.shape
        return torch.multinomial(probs.view(-1, vocab), num_samples=1).view(batch, canvas)


class PerRowNoise(GlobalNoise):
    """Draws from one seeded generator per row, only for rows in ``active``.

    A row's stream is exactly what the global generator gives after ``torch.manual_seed(seed)``
    for a batch of one, so a row generated in any batch draws the same numbers as the same
    prompt generated alone with the same seed. Inactive rows get zeros (the loop keeps their
    previous state anyway).
    """

    per_row = True

    def __init__(self, vocab_size: int, canvas_length: int, device: torch.device, seeds: Sequence[int]):
        super().__init__(vocab_size, canvas_length, device)
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    def _rows(self, active: torch.Tensor | None) -> list[int]:
        if active is None:
            return list(range(len(self.generators)))
        return [i for i, on in enumerate(active.tolist()) if on]

    def uniform_canvas(self, batch_size: int, active: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros((batch_size, self.canvas_length), dtype=torch.long, device=self.device)
        for row in self._rows(active):
            out[row] = torch.randint(0, self.vocab_size, (self.canvas_length,), device=self.device,
                                     generator=self.generators[row])
        return out

    def sample(self, probs: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros(probs.shape[:2], dtype=torch.long, device=self.device)
        for row in self._rows(active):
            out[row] = torch.multinomial(probs[row], num_samples=1, generator=self.generators[row]).squeeze(-1)
        return out


def renoise(accepted_canvas: torch.Tensor, accepted: torch.Tensor, noise: GlobalNoise,
            active: torch.Tensor | None = None) -> torch.Tensor:
    """Replace every position that was not accepted by a fresh uniform token."""
    fresh = noise.uniform_canvas(accepted_canvas.shape[0], active)
    return torch.where(~accepted, fresh, accepted_canvas)


# -- the samplers: one step's draw, exact or fast ------------------------------------------------


def soft_cap(raw: torch.Tensor, cap: float | None) -> torch.Tensor:
    """fp32 logits soft-capped at ``cap`` exactly as ``DiffusionGemmaForBlockDiffusion.forward`` does."""
    logits = raw.to(torch.float32)
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


class ExactSampler:
    """transformers' formulas and random draws: softmax -> ``multinomial`` over every position,
    entropy as ``Categorical`` computes it. Token-identical to ``generate()`` on the CPU."""

    exact = True
    capturable = False

    def __init__(self, noise: GlobalNoise, softcap: float | None):
        self.noise = noise
        self.softcap = softcap
        self.per_row = noise.per_row

    def initial_canvas(self, batch_size: int, active: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        return self.noise.uniform_canvas(batch_size, active)

    def draw(self, raw: torch.Tensor, temperature: torch.Tensor, *, active: torch.Tensor, canvas: torch.Tensor,
             step: torch.Tensor, out_dtype: torch.dtype, capped: bool = False) -> tuple[torch.Tensor, ...]:
        """``(sampled, argmax, entropy, scaled logits in out_dtype)`` from raw lm_head logits ``(B, C, V)``
        (already soft-capped float32 logits when ``capped``)."""
        scaled = (raw if capped else soft_cap(raw, self.softcap)) / temperature
        probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
        sampled = self.noise.sample(probs, active)
        return sampled, torch.argmax(scaled, dim=-1), token_entropy(scaled), scaled.to(out_dtype)

    def renoise(self, accepted_canvas: torch.Tensor, accepted: torch.Tensor, *, active: torch.Tensor,
                canvas: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return renoise(accepted_canvas, accepted, self.noise, active)


class FastSampler:
    """Counter-based noise and one pass over the logits (:func:`diffgen.kernels.sampler.sample_tail`:
    a Triton kernel on CUDA, torch elsewhere): soft-cap, temperature, entropy, argmax and a
    Gumbel-max draw read the ``B x C x V`` logits once, with no ``multinomial`` and no host sync.

    Every draw is a pure function of (row seed, canvas, step, position): a captured step
    replays without re-seeding, a row's tokens do not depend on the other rows of the batch,
    and the loop may run frozen steps past the moment every row stopped without changing any
    later draw. Reproducible with the same seeds on the same device and code path; not
    token-identical to ``generate()``.

    Attributes:
        row_seeds: ``(B,)`` int64 on the device, one seed per row.
    """

    exact = False
    capturable = True
    per_row = True

    def __init__(self, vocab_size: int, canvas_length: int, row_seeds: torch.Tensor, softcap: float | None,
                 backend: str = "auto"):
        self.vocab_size, self.canvas_length = vocab_size, canvas_length
        self.row_seeds = row_seeds
        self.softcap = softcap
        self.backend = backend

    def initial_canvas(self, batch_size: int, active: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        from diffgen.kernels.noise import STREAM_CANVAS
        from diffgen.kernels.sampler import noise_tokens

        return noise_tokens(self.row_seeds, canvas, 0, STREAM_CANVAS, self.canvas_length, self.vocab_size,
                            backend=self.backend)

    def draw(self, raw: torch.Tensor, temperature: torch.Tensor, *, active: torch.Tensor, canvas: torch.Tensor,
             step: torch.Tensor, out_dtype: torch.dtype, capped: bool = False) -> tuple[torch.Tensor, ...]:
        from diffgen.kernels.sampler import sample_tail

        # The Gumbel keys, step_keys(row_seeds, canvas, step, STREAM_GUMBEL), are derived inside the
        # Triton kernel (no torch ops); the torch backend computes them with step_keys.
        scaled = torch.empty(raw.shape, dtype=out_dtype, device=raw.device)
        sampled, argmax, entropy = sample_tail(raw, softcap=None if capped else self.softcap, temperature=temperature,
                                               seeds=self.row_seeds, canvas=canvas, step=step,
                                               self_conditioning_out=scaled, backend=self.backend)
        return sampled, argmax, entropy, scaled

    def renoise(self, accepted_canvas: torch.Tensor, accepted: torch.Tensor, *, active: torch.Tensor,
                canvas: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        from diffgen.kernels.noise import STREAM_RENOISE
        from diffgen.kernels.sampler import noise_tokens

        # One Triton launch (keys, tokens and the selection); torch: step_keys, uniform_tokens, where.
        return noise_tokens(self.row_seeds, canvas, step, STREAM_RENOISE, self.canvas_length, self.vocab_size,
                            keep=accepted_canvas, accepted=accepted, backend=self.backend)
