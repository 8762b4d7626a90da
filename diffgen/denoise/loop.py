"""The denoising loop: one generator of step and canvas events, and the collected result.

Three layers, every consumer (``run``, batch jobs, live views, benchmarks, tests) on the same
loop:

* :func:`stream` returns a :class:`Generation`; iterating it runs the loop and yields a
  :class:`StepEvent` after every denoising step and a :class:`CanvasEvent` after every
  committed canvas.
* :attr:`Generation.result` then holds the :class:`GenerationResult`: per prompt the text,
  the token ids, the finish reason and :class:`CompletionStats`.
* :func:`generate` runs a generation to the end and returns its result.

The loop is an own implementation of transformers' ``DiffusionGemmaGenerationMixin.generate``
(docs/architecture.md, "Facts the code relies on": reference semantics) over the model's
encoder and decoder forward passes. With the same seed on the CPU it produces the same tokens:
same operations, same random draws in the same order. The events and the result it yields and
returns are :mod:`diffgen.denoise.events`.

Events carry device tensors and are built from values the loop computes anyway; nothing is
copied to the host per step unless a consumer reads them (``observe=False`` skips building
step events at all).

The library API (``load`` from :mod:`diffgen.loading.loader`, ``LoadPlan`` from
:mod:`diffgen.planning.plan`, ``encode`` from :mod:`diffgen.prompt`, the rest from here)::

    loaded = load(path, LoadPlan("cpu", "float32"))
    ids = encode(loaded.tokenizer, "Why is the sky blue?")
    settings = loaded.defaults.replace(max_new_tokens=512, seed=1)
    result = generate(loaded, [ids], settings)                      # a GenerationResult
    for event in stream(loaded, [ids], settings, execution=Execution(exact=False)): ...

Besides ``observe``, ``seeds``, ``vision`` and ``cache``, :func:`stream` takes two option groups
(:mod:`diffgen.denoise.options`): :class:`Execution` (sampler, CUDA graphs, ``torch.compile``,
host-sync cadence) and :class:`Constraints` (clamped, seeded or restricted positions: what
:mod:`diffgen.denoise.constrained` passes).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from diffgen.denoise.backends import DynamicBackend, cache_keyword, run_encoder
from diffgen.denoise.channels import split_response
from diffgen.denoise.events import (CanvasEvent, Completion, CompletionStats, Event, FinishReason, GenerationResult,
                                    StepEvent, cut_completion)
from diffgen.denoise.fused import fusable, fused_enabled
from diffgen.denoise.kv import bucket
from diffgen.denoise.options import Constraints, Execution
from diffgen.denoise.runner import FAST_CHECK_EVERY, CanvasRunner, commit_canvas, runner_for
from diffgen.denoise.sampling import ExactSampler, FastSampler, GlobalNoise, PerRowNoise, TemperatureSchedule
from diffgen.denoise.step import StepState, clone_state, compiled_step
from diffgen.errors import PromptTooLongError, UsageError
from diffgen.settings import GenerationSettings

if TYPE_CHECKING:
    from diffgen.denoise.prompt_cache import PromptCache
    from diffgen.images import VisionInputs
    from diffgen.loading.loader import LoadedModel

# (re-exported: one import for callers)
__all__ = ["FAST_CHECK_EVERY", "cache_keyword", "run_encoder", "stream", "generate", "Generation", "Execution",
           "Constraints", "CanvasEvent", "Completion", "CompletionStats", "Event", "FinishReason", "GenerationResult",
           "StepEvent", "cut_completion"]


@dataclass
class _Progress:
    """One run's state across its canvases (what :meth:`Generation._canvas` reads and advances)."""

    start: float
    runner: CanvasRunner
    sampler: ExactSampler | FastSampler
    eos: torch.Tensor
    schedule: TemperatureSchedule
    stop_finished: bool
    finished: torch.Tensor  # (B,) rows that met an EOS so far
    forwards: torch.Tensor  # (B,) decoder passes each row took part in
    committed: list[torch.Tensor] = field(default_factory=list)  # one (B, C) per canvas
    row_steps: list[torch.Tensor] = field(default_factory=list)  # per canvas, each row's passes


class Generation:
    """A generation ready to run: iterate it for events; :attr:`result` afterwards (see :func:`stream`).

    Attributes:
        execution: the :class:`Execution` resolved for the model's device (no ``None`` left).
        constraints: the :class:`Constraints`, checked against the prompts and canvases.
        runner: the :class:`~diffgen.denoise.runner.CanvasRunner` it ran on (once started).
    """

    def __init__(self, loaded: LoadedModel, prompts: Sequence[Sequence[int]], settings: GenerationSettings,
                 *, observe: bool = True, seeds: Sequence[int] | None = None, execution: Execution = Execution(),
                 constraints: Constraints = Constraints(), vision: Sequence[VisionInputs | None] | None = None,
                 cache: PromptCache | None = None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UsageError("every prompt needs at least one token")
        if cache is not None and (len(prompts) != 1 or vision is not None and any(v is not None for v in vision)):
            # (images: their placeholder tokens are the same ids whatever the picture, so the
            # common-prefix rule cannot tell two images apart)
            raise UsageError(f"a prompt cache serves one text prompt at a time, not {len(prompts)} or images")
        self.prompt_cache = cache
        if seeds is not None and len(seeds) != len(prompts):
            raise UsageError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        self.seeds = list(seeds) if seeds is not None else None
        self.execution = execution.resolve(loaded.model.device)
        self.runner: CanvasRunner | None = None
        self.loaded = loaded
        self.settings = settings
        self.observe = observe
        self.canvas_length = int(loaded.model.config.canvas_length)
        self.canvases = math.ceil(settings.max_new_tokens / self.canvas_length)
        constraints.check(len(prompts), self.canvases * self.canvas_length)
        self.constraints = constraints
        self._prompts = [list(p) for p in prompts]
        self._vision = _check_vision(vision, self._prompts)
        self._check_context()
        self._result: GenerationResult | None = None
        self._started = False

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("the generation has not run to the end yet: iterate it first")
        return self._result

    def __iter__(self) -> Iterator[Event]:
        if self._started:
            raise RuntimeError("a Generation runs once; call stream() again for another run")
        self._started = True
        with torch.no_grad():
            yield from self._run()

    # -- internals -------------------------------------------------------------------------

    def _check_context(self) -> None:
        check_context(self.loaded.model, max(len(p) for p in self._prompts), self.settings)

    def _row_seeds(self, batch_size: int) -> list[int]:
        """One seed per row: the given ones, else derived from ``settings.seed`` (row 0 keeps it)."""
        if self.seeds is not None:
            return [int(seed) for seed in self.seeds]
        base = self.settings.seed if self.settings.seed is not None else secrets.randbits(62)
        return [base] + [(base * 1_000_003 + row * 7_919) % 2**62 for row in range(1, batch_size)]

    def _fused(self) -> bool:
        """Whether this generation runs diffgen's fused passes over the static cache."""
        return not self.execution.exact and fused_enabled() and fusable(self.loaded.model)

    def _runner(self, device: torch.device) -> CanvasRunner:
        """The canvas runner, its prompts prefilled (pooled for the fused passes: graphs once a process)."""
        execution = self.execution
        step_fn = compiled_step() if execution.compile else None
        batch = len(self._prompts)
        pad = self.settings.pad_token_id
        if self._fused():
            needed = max(len(p) for p in self._prompts) + self.canvases * self.canvas_length
            runner = runner_for(self.loaded, batch, bucket(needed), graphs=execution.graphs, step_fn=step_fn)
            runner.backend.load(self._prompts, range(batch), pad, self._vision_inputs(device), self.prompt_cache)
        else:
            backend = DynamicBackend(self.loaded, self._prompts, pad, self.prompt_cache)
            runner = CanvasRunner(self.loaded, backend, graphs=execution.graphs, step_fn=step_fn)
            backend.prefill(self._vision_inputs(device))
        runner.set_seeds(self._row_seeds(batch))
        return runner

    def _exact_sampler(self, device: torch.device) -> ExactSampler:
        model = self.loaded.model
        vocab_size = model.config.text_config.vocab_size
        softcap = getattr(model.config.text_config, "final_logit_softcapping", None)
        if self.seeds is None:
            return ExactSampler(GlobalNoise(vocab_size, self.canvas_length, device), softcap)
        return ExactSampler(PerRowNoise(vocab_size, self.canvas_length, device, self.seeds), softcap)

    def _run(self) -> Iterator[Event]:
        settings = self.settings
        device = self.loaded.model.device
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        exact = self.execution.exact
        if settings.seed is not None and exact:
            torch.manual_seed(settings.seed)
        batch_size = len(self._prompts)
        runner = self.runner = self._runner(device)
        sampler = self._exact_sampler(device) if exact else runner.sampler
        progress = _Progress(
            start=start, runner=runner, sampler=sampler, eos=torch.tensor(settings.eos_token_ids, device=device),
            schedule=TemperatureSchedule(settings.t_min, settings.t_max, settings.max_denoising_steps),
            # The reference keeps denoising rows that ended in an earlier canvas until every row
            # stops; with per-row noise those rows are done and draw nothing.
            stop_finished=sampler.per_row or not exact,
            finished=torch.zeros(batch_size, dtype=torch.bool, device=device),
            forwards=torch.zeros(batch_size, dtype=torch.int, device=device))
        for canvas_index in range(self.canvases):
            if canvas_index > 0:  # the committed canvas joins the cache (the prompt was prefilled)
                runner.run_encoder(progress.committed[-1])
            yield from self._canvas(canvas_index, progress)
            if bool(progress.finished.all()):
                break
        self._result = self._collect(progress.committed, progress.row_steps, progress.forwards, start)

    def _canvas(self, index: int, progress: _Progress) -> Iterator[Event]:
        """Denoise canvas ``index`` of every row (its step events, then its canvas event), and commit it."""
        device = self.loaded.model.device
        runner, settings = progress.runner, self.settings
        canvas_tensor = torch.tensor(index, dtype=torch.long, device=device)
        canvas = progress.sampler.initial_canvas(len(self._prompts), ~progress.finished, canvas_tensor)
        # This canvas's slice of the per-position constraints (fill, edit, schema), if any.
        here = self.constraints.canvas(index, self.canvas_length, device)
        if here.init is not None:
            # Seeded positions start from their token instead of noise; the noise is still drawn
            # (and discarded there), so the random draws keep their order.
            canvas = torch.where(here.init[1], here.init[0], canvas)
        clamp = here.clamp
        clamp_mask = None if clamp is None else clamp[1]
        if clamp is not None and bool(clamp[1].all()):
            # Nothing to denoise: the canvas is fixed text, committed as context as is.
            progress.committed.append(clamp[0].clone())
            progress.row_steps.append(torch.zeros_like(progress.forwards))
            yield CanvasEvent(canvas=index, canvases=self.canvases, tokens=clamp[0].clone(), steps=0,
                              finished=progress.finished, elapsed=time.perf_counter() - progress.start,
                              fixed=clamp_mask)
            return
        forwards_before = progress.forwards
        steps, state = 0, None
        for steps, state in runner.denoise(settings, canvas, progress.finished, canvas_tensor, progress.forwards,
                                           sampler=progress.sampler, clamp=clamp, allowed=here.allowed,
                                           check_every=self.execution.check_every,
                                           stop_finished=progress.stop_finished):
            if self.observe:
                yield self._step_event(index, steps, state, progress, clamp_mask)
        progress.forwards = state.forwards.clone()
        if clamp is None:
            committed, progress.finished = commit_canvas(state.draft, progress.finished, progress.eos,
                                                         settings.pad_token_id)
        else:
            # A template's layout is fixed: an EOS inside a hole ends that hole, not the generation.
            committed = state.draft.clone()
        progress.committed.append(committed)
        progress.row_steps.append(progress.forwards - forwards_before)
        yield CanvasEvent(canvas=index, canvases=self.canvases, tokens=committed, steps=steps,
                          finished=progress.finished, elapsed=time.perf_counter() - progress.start, fixed=clamp_mask)

    def _step_event(self, index: int, steps: int, state: StepState, progress: _Progress,
                    fixed: torch.Tensor | None) -> StepEvent:
        n_steps = self.settings.max_denoising_steps
        shown = clone_state(state) if progress.runner.graphs else state
        return StepEvent(
            canvas=index, canvases=self.canvases, step=steps, max_steps=n_steps,
            temperature=progress.schedule.value(n_steps - steps + 1), accepted=shown.accepted,
            draft=shown.draft, canvas_tokens=shown.canvas, token_entropy=shown.entropy,
            mean_entropy=shown.mean_entropy, finished=shown.stopped | progress.finished,
            elapsed=time.perf_counter() - progress.start, fixed=fixed,
        )

    def _vision_inputs(self, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The batch's image inputs for the encoder: every row's images in row order (the order
        in which the encoder scatters them over the image tokens), token types left padded."""
        if self._vision is None:
            return None
        rows = [v for v in self._vision if v is not None]
        longest = max(len(p) for p in self._prompts)
        types = [[0] * (longest - len(p)) + (list(v.token_types) if v is not None else [0] * len(p))
                 for p, v in zip(self._prompts, self._vision)]
        return {
            "pixel_values": torch.cat([v.pixel_values for v in rows]).to(device),
            "image_position_ids": torch.cat([v.image_position_ids for v in rows]).to(device),
            "mm_token_type_ids": torch.tensor(types, dtype=torch.long, device=device),
        }

    def _collect(self, canvases: list[torch.Tensor], row_steps: list[torch.Tensor], forwards: torch.Tensor,
                 start: float) -> GenerationResult:
        settings = self.settings
        device = forwards.device
        generated = torch.cat(canvases, dim=-1).tolist()
        steps = torch.stack(row_steps, dim=-1).tolist()
        forwards_list = forwards.tolist()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        seconds = time.perf_counter() - start
        completions = []
        for row, tokens in enumerate(generated):
            tokens, reason = cut_completion(tokens, settings)
            response = split_response(self.loaded.tokenizer, tokens)
            stats = CompletionStats(
                prompt_tokens=len(self._prompts[row]),
                new_tokens=len(tokens),
                canvases=len(canvases),
                steps_per_canvas=tuple(steps[row]),
                tokens_per_forward=len(tokens) / max(forwards_list[row], 1),
                seconds=seconds,
                tokens_per_second=len(tokens) / seconds if seconds > 0 else 0.0,
                peak_memory_bytes=peak,
            )
            completions.append(Completion(response.text, response.thoughts, tuple(tokens), reason, stats))
        return GenerationResult(tuple(completions), settings)


def _check_vision(vision: Sequence[VisionInputs | None] | None, prompts: list[list[int]]
                  ) -> list[VisionInputs | None] | None:
    """The per-prompt image inputs, checked against the prompts; ``None`` when no prompt has images."""
    if vision is None or all(v is None for v in vision):
        return None
    if len(vision) != len(prompts):
        raise UsageError(f"{len(vision)} image inputs for {len(prompts)} prompts")
    for row, (v, p) in enumerate(zip(vision, prompts)):
        if v is not None and len(v.token_types) != len(p):
            raise UsageError(f"prompt {row}: {len(v.token_types)} token types for {len(p)} tokens")
    return list(vision)


def check_context(model, prompt_tokens: int, settings: GenerationSettings) -> None:
    """Raise :class:`PromptTooLongError` when the prompt plus its canvases exceed the context."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    _check_context(int(model.config.canvas_length), limit, prompt_tokens, settings)


def check_context_config(config: dict, prompt_tokens: int, settings: GenerationSettings) -> None:
    """The same check from a parsed config.json, before any weights are loaded."""
    text = config.get("text_config", config)
    _check_context(int(config.get("canvas_length", 256)), text.get("max_position_embeddings"), prompt_tokens,
                   settings)


def _check_context(canvas_length: int, limit: int | None, prompt_tokens: int, settings: GenerationSettings) -> None:
    canvases = math.ceil(settings.max_new_tokens / canvas_length)
    needed = prompt_tokens + canvases * canvas_length
    if limit is not None and needed > limit:
        raise PromptTooLongError(
            f"the prompt ({prompt_tokens} tokens) plus {canvases} canvas(es) of {canvas_length} "
            f"tokens needs {needed} positions, more than the model's context of {limit}",
            "shorten the prompt or lower --max-new-tokens",
        )


def stream(loaded: LoadedModel, prompts: Sequence[Sequence[int]], settings: GenerationSettings,
           *, observe: bool = True, seeds: Sequence[int] | None = None, execution: Execution = Execution(),
           constraints: Constraints = Constraints(), vision: Sequence[VisionInputs | None] | None = None,
           cache: PromptCache | None = None) -> Generation:
    """Prepare a generation of ``prompts`` (token id lists; several are batched, left padded).

    ``observe=False`` skips building step events. ``seeds``, one per prompt: each row draws from
    its own stream, so its tokens do not depend on the rest of the batch (both samplers; the fast
    one always works per row, deriving row seeds from ``settings.seed`` when ``seeds`` is not
    given). ``execution``: sampler, CUDA graphs, ``torch.compile``, host-sync cadence
    (:class:`~diffgen.denoise.options.Execution`; default: the device's choices).
    ``constraints``: clamped, seeded or restricted positions for constrained generation
    (:class:`~diffgen.denoise.options.Constraints`: infilling,
    :mod:`diffgen.denoise.constrained.fill`; editing, :mod:`diffgen.denoise.constrained.edit`; JSON
    by construction, :mod:`diffgen.denoise.constrained.schema`). ``vision``, one
    :class:`~diffgen.images.VisionInputs` or ``None`` per prompt: the prompts' images, encoded with
    the prompt as in transformers' ``generate()``. ``cache``, a
    :class:`~diffgen.denoise.prompt_cache.PromptCache` (one text prompt only), keeps the encoder's
    KV cache from one generation to the next: the prompt's longest common prefix with what it
    holds is not encoded again (``diffgen chat``'s turns).
    """
    return Generation(loaded, prompts, settings, observe=observe, seeds=seeds, execution=execution,
                      constraints=constraints, vision=vision, cache=cache)


def generate(loaded: LoadedModel, prompts: Sequence[Sequence[int]], settings: GenerationSettings,
             *, seeds: Sequence[int] | None = None, execution: Execution = Execution(),
             vision: Sequence[VisionInputs | None] | None = None) -> GenerationResult:
    """Run a generation to the end and return its result (:func:`stream`'s keywords)."""
    generation = stream(loaded, prompts, settings, observe=False, seeds=seeds, execution=execution, vision=vision)
    for _ in generation:
        pass
    return generation.result
