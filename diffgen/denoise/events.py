"""What a generation yields and returns: step and canvas events, completions and their stats.

The loop (:mod:`diffgen.denoise.loop`) and the batcher (:mod:`diffgen.denoise.batcher`) build
these; views, records, the server and benchmarks read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from diffgen.settings import GenerationSettings

FinishReason = Literal["eos", "length"]


@dataclass(frozen=True)
class StepEvent:
    """One denoising step of one canvas, for every row of the batch.

    Tensors live on the model's device; reading them (``.tolist()``, ``.cpu()``) is the
    consumer's choice and cost.

    Attributes:
        canvas: index of the canvas being denoised, from 0.
        canvases: canvases planned (``ceil(max_new_tokens / canvas_length)``); fewer run when
            every row meets an EOS earlier.
        step: denoising steps done on this canvas so far, from 1.
        max_steps: N, the step budget per canvas.
        temperature: the schedule's temperature at this step.
        accepted: ``(B, C)`` bool, positions whose sampled token was accepted at this step
            (all other positions were renoised). Meaningless for rows in ``finished``.
        draft: ``(B, C)`` int64, the argmax of the temperature-scaled logits: the text the
            canvas would commit to if denoising stopped now.
        canvas_tokens: ``(B, C)`` int64, the canvas after acceptance and renoising, which the
            next step reads.
        token_entropy: ``(B, C)`` float32, entropy in nats of each position's distribution.
        mean_entropy: ``(B,)`` float32, mean of ``token_entropy`` over the canvas.
        finished: ``(B,)`` bool, rows that no longer change this canvas: adaptive stopping
            fired for them, or they met an EOS in an earlier canvas.
        elapsed: seconds since the generation started, read on the host (on a GPU this is
            when the step was queued, not when it finished).
        fixed: ``(B, C)`` bool, the positions clamped on this canvas (``clamp`` in
            :func:`stream`: template or document text, pad after it), or ``None``: none.
    """

    canvas: int
    canvases: int
    step: int
    max_steps: int
    temperature: float
    accepted: torch.Tensor
    draft: torch.Tensor
    canvas_tokens: torch.Tensor
    token_entropy: torch.Tensor
    mean_entropy: torch.Tensor
    finished: torch.Tensor
    elapsed: float
    fixed: torch.Tensor | None = None


@dataclass(frozen=True)
class CanvasEvent:
    """A canvas committed for every row.

    Attributes:
        canvas: index of the committed canvas, from 0.
        canvases: canvases planned.
        tokens: ``(B, C)`` int64, the committed tokens (the last step's argmax), with pad
            after a row's first EOS and for rows that ended in an earlier canvas.
        steps: denoising steps (decoder forward passes) this canvas took for the batch.
        finished: ``(B,)`` bool, rows that have met an EOS so far.
        elapsed: seconds since the generation started.
        fixed: ``(B, C)`` bool, the positions clamped on this canvas, or ``None``: none.
    """

    canvas: int
    canvases: int
    tokens: torch.Tensor
    steps: int
    finished: torch.Tensor
    elapsed: float
    fixed: torch.Tensor | None = None


Event = StepEvent | CanvasEvent


@dataclass(frozen=True)
class CompletionStats:
    """Numbers for one completion.

    Attributes:
        prompt_tokens: tokens in the prompt (padding excluded).
        new_tokens: tokens returned (``len(Completion.token_ids)``).
        canvases: canvases generated for the batch.
        steps_per_canvas: decoder forward passes this row took, per canvas (0 for canvases
            after the row had ended).
        tokens_per_forward: ``new_tokens`` divided by this row's decoder forward passes.
        seconds: wall time of the whole generation, prefill included.
        tokens_per_second: ``new_tokens / seconds``.
        peak_memory_bytes: peak accelerator memory allocated by torch during the generation
            (CUDA only; ``None`` where torch cannot tell).
    """

    prompt_tokens: int
    new_tokens: int
    canvases: int
    steps_per_canvas: tuple[int, ...]
    tokens_per_forward: float
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int | None


@dataclass(frozen=True)
class Completion:
    """One prompt's output.

    Attributes:
        text: the answer, decoded without special tokens and without the thought channel.
        thoughts: the thought channel's text, or ``None`` when the model opened none.
        token_ids: generated ids, cut before the first EOS and at ``max_new_tokens``
            (thought-channel tokens included).
        finish_reason: ``"eos"`` when the model ended the answer, ``"length"`` when
            ``max_new_tokens`` cut it.
        stats: numbers for this completion (``None`` only for a json_schema answer the server
            generated: :func:`diffgen.denoise.solo.schema_items`).
    """

    text: str
    thoughts: str | None
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    stats: CompletionStats | None


@dataclass(frozen=True)
class GenerationResult:
    """All completions of one generation, in prompt order, and the settings used."""

    completions: tuple[Completion, ...]
    settings: GenerationSettings


def cut_completion(tokens: Sequence[int], settings: GenerationSettings) -> tuple[list[int], FinishReason]:
    """Generated ids cut before the first EOS (``"eos"``) or else at ``max_new_tokens`` (``"length"``)."""
    eos_ids = set(settings.eos_token_ids)
    end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    if end is not None and end <= settings.max_new_tokens:
        return list(tokens[:end]), "eos"
    return list(tokens[: settings.max_new_tokens]), "length"

