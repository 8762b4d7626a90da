"""The canvas runner: one canvas of a batch, step by step, for the loop and the continuous batcher.

:func:`~diffgen.denoise.loop.stream` (one generation) and :class:`~diffgen.denoise.batcher.Batcher`
(rows joining and leaving between canvases) both denoise through :class:`CanvasRunner`: it builds
the temperature schedule, the acceptance rule and the step context, records and replays CUDA
graphs, runs the steps, decides when every row has stopped, and encodes committed canvases. The
callers keep what is theirs: which prompts, events or deliveries, commit bookkeeping.

Graphs. Over a :class:`~diffgen.denoise.backends.StaticBackend` every input of the step lives in a
buffer the runner owns (finished rows, canvas indices, row seeds, clamps, allowed tokens: copied in
at each canvas), and the decoder reads positions and masks from the static KV cache, so one graph
recorded for a (slot count, context bucket, settings) replays for every later canvas and
generation: **recorded once per process**, not per canvas. The committed canvas's encoder pass is
recorded too. Runners are pooled per model (:func:`runner_for`), so a server or a chat keeps its
graphs. Over a :class:`~diffgen.denoise.backends.DynamicBackend` (transformers' modules) the
decoder is bound to one canvas, so its graph is recorded per canvas, as before.
``DIFFGEN_CUDA_GRAPHS=0`` turns graphs off; ``DIFFGEN_GRAPHS_PER_CANVAS=1`` records per canvas
even over the static backend (for comparison in ``bench/gpu_session.py``). Every graph is recorded
by :data:`recorder`.

Warm-up: the first recording of a (device, slots, model) waits for one eager step with
self-conditioning, so that lazy work (cuBLAS workspaces, Triton compilation and autotuning) never
happens inside a capture; the encoder's first pass runs eagerly for the same reason. A step that
cannot be recorded warns once and runs eagerly from then on.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING

import torch

from diffgen.denoise.sampling import ExactSampler, FastSampler, TemperatureSchedule, entropy_bound_acceptance
from diffgen.denoise.step import STATE_FIELDS_OUT, StepContext, StepState, denoise_step, initial_state
from diffgen.settings import GenerationSettings

if TYPE_CHECKING:
    from diffgen.denoise.backends import DynamicBackend, StaticBackend
    from diffgen.loading.loader import LoadedModel

#: How many steps pass between host syncs that ask whether every row stopped (fast sampler).
FAST_CHECK_EVERY = 4
#: Runners (each with its KV buffers and graphs) kept per model.
POOL_SIZE = 2


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in {"0", "false", "no", "off", ""}


def graphs_enabled() -> bool:
    """``DIFFGEN_CUDA_GRAPHS`` (default on)."""
    return _flag("DIFFGEN_CUDA_GRAPHS", "1")


def graphs_per_canvas() -> bool:
    """``DIFFGEN_GRAPHS_PER_CANVAS`` (default off): record the step anew for every canvas."""
    return _flag("DIFFGEN_GRAPHS_PER_CANVAS", "0")


def commit_canvas(draft: torch.Tensor, finished: torch.Tensor, eos: torch.Tensor,
                  pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit a canvas (the last step's draft): rows ended earlier become all pad, pad follows a
    row's first EOS. Returns the committed tokens and the rows finished now."""
    committed = draft.clone()
    is_eos = torch.isin(committed, eos)
    ended_now = is_eos.any(dim=-1)
    committed[finished] = pad_token_id
    is_eos = torch.isin(committed, eos)
    seen = is_eos.cumsum(dim=-1)
    committed[(seen > 0) & ~((seen == 1) & is_eos)] = pad_token_id
    return committed, finished | ended_now


class CudaGraph:
    """``body`` recorded into a CUDA graph (its own memory pool); calling it replays the graph."""

    def __init__(self, body: Callable[[], None]):
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            body()
        self.graph: torch.cuda.CUDAGraph | None = graph

    def __call__(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        """Free the graph and its memory pool (a graph recorded per canvas, at the canvas's end)."""
        if self.graph is not None:
            self.graph.reset()
            self.graph = None


class CudaGraphRecorder:
    """Records the step and the encoder pass as CUDA graphs, on CUDA devices."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def record(self, body: Callable[[], None]) -> Callable[[], None]:
        """``body`` recorded; calling the result replays it (a ``release()`` method, where it has
        one, frees what the recording holds)."""
        return CudaGraph(body)


#: What every runner records its graphs with (read at each recording). The one seam for graphs
#: off CUDA: the tests put a recorder here that replays by running the body eagerly, the
#: CUDA-graph path's logic on the CPU (tests/conftest.py, ``eager_graphs``).
recorder = CudaGraphRecorder()


def graphs_supported(device: torch.device) -> bool:
    """Whether :data:`recorder` records graphs on ``device``."""
    return recorder.supports(device)


# Warm-up keys already served in this process (see the module's docstring).
_WARM: set[Hashable] = set()


class StepGraph:
    """The step recorded as one graph writing into a static copy of the state.

    The first step of a canvas, which the reference runs without self-conditioning, replays the
    same graph with a per-row ``self_conditioning_mask`` of False over the previous logits (the
    decoder multiplies the soft embeddings by it: exactly the reference's zeros); the graph sets
    the mask for the following replays. :meth:`begin_canvas` copies a new canvas's first state
    into the static one.
    """

    def __init__(self, step_fn: Callable[..., StepState], warm_key: Hashable, masked_first_step: bool):
        self.step_fn = step_fn
        self.warm_key, self.masked_first_step = warm_key, masked_first_step
        self.replay: Callable[[], None] | None = None
        self.static: StepState | None = None
        self.mask: torch.Tensor | None = None

    def begin_canvas(self, state: StepState) -> None:
        if self.replay is None:
            return
        for f in fields(StepState):
            source, target = getattr(state, f.name), getattr(self.static, f.name)
            if source is not None and target is not None and f.name != "self_conditioning":
                target.copy_(source)
        self.mask.fill_(False)

    def release(self) -> None:
        release = getattr(self.replay, "release", None)
        if release is not None:
            release()
        self.replay, self.static, self.mask = None, None, None

    def ready(self, state: StepState) -> bool:
        """Whether to record now (else the caller steps eagerly: warm-up, or an unmaskable first step)."""
        first = state.self_conditioning is None
        if first and (not self.masked_first_step or self.warm_key not in _WARM):
            return False
        if self.warm_key not in _WARM:
            _WARM.add(self.warm_key)
            return False
        return True

    def record(self, state: StepState, context: StepContext) -> None:
        static = StepState(**{f.name: (None if getattr(state, f.name) is None else getattr(state, f.name).clone())
                              for f in fields(StepState)})
        batch, length = static.canvas.shape
        mask = torch.ones(batch, dtype=torch.bool, device=static.canvas.device)
        if static.self_conditioning is None:
            static = replace(static, self_conditioning=torch.zeros(
                (batch, length, int(context.sampler.vocab_size)), dtype=context.embed_dtype,
                device=static.canvas.device))
            mask.fill_(False)

        def body() -> None:
            out = self.step_fn(static, context, self_conditioning_mask=mask)
            for name in STATE_FIELDS_OUT:
                target = getattr(static, name)
                if target is not None:
                    target.copy_(getattr(out, name))
            mask.fill_(True)

        self.replay = recorder.record(body)
        self.static, self.mask = static, mask


def _settings_key(settings: GenerationSettings) -> tuple:
    return (settings.max_denoising_steps, settings.t_min, settings.t_max, settings.entropy_bound,
            settings.stability_window, settings.confidence_threshold)


class CanvasRunner:
    """Denoises canvases of up to ``backend.slots`` rows (see the module's docstring).

    Attributes:
        backend: where keys and values live (:mod:`diffgen.denoise.backends`).
        sampler: the fast sampler over the runner's own row seeds (:meth:`set_seeds`).
        captures: graphs recorded so far (steps and encoder passes).
        capture_seconds: host time spent recording them.
        failed: why recording failed, or ``None``.
    """

    def __init__(self, loaded: LoadedModel, backend: StaticBackend | DynamicBackend, *, graphs: bool = False,
                 step_fn: Callable[..., StepState] | None = None):
        model = loaded.model
        self.loaded, self.backend = loaded, backend
        self.device = model.device
        self.graphs = graphs
        self._step_fn = step_fn
        slots = backend.slots
        text = model.config.get_text_config()
        self.vocab_size = int(text.vocab_size)
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.canvas_length = int(model.config.canvas_length)
        self.embed_dtype = model.model.decoder.embed_tokens.weight.dtype
        self.finished = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.canvas_index = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.sampler = FastSampler(self.vocab_size, self.canvas_length, self.seeds, self.softcap)
        if backend.static:
            self.masked_first_step = True
        else:
            import inspect

            self.masked_first_step = "self_conditioning_mask" in inspect.signature(
                type(model.model.decoder).forward).parameters
        self._contexts: dict[tuple, tuple[StepContext, StepGraph | None]] = {}
        self._encoder: tuple[Callable[[], None] | None, bool] = (None, False)  # (replay, warmed)
        self.captures = 0
        self.capture_seconds = 0.0
        self.failed: str | None = None

    @property
    def step_fn(self) -> Callable[..., StepState]:
        """The step function: the one given, else :func:`~diffgen.denoise.step.denoise_step`."""
        return self._step_fn or denoise_step

    # -- rows ------------------------------------------------------------------------------------

    def set_seeds(self, seeds: Sequence[int], slots: Sequence[int] | None = None) -> None:
        """Row seeds of the fast sampler (``slots``: which rows; default all, in order)."""
        values = torch.tensor([int(seed) for seed in seeds], dtype=torch.long, device=self.device)
        if slots is None:
            self.seeds.copy_(values)
        else:
            self.seeds[torch.tensor(list(slots), dtype=torch.long, device=self.device)] = values

    # -- passes ----------------------------------------------------------------------------------

    def run_encoder(self, tokens: torch.Tensor) -> None:
        """Encode a committed canvas ``(slots, C)`` into the cache."""
        backend = self.backend
        if not backend.static:
            backend.run_encoder(tokens)
            return
        backend.tokens.copy_(tokens)
        replay, warmed = self._encoder
        if replay is None and warmed and self._recording():
            replay = self._record(backend.encoder_pass)
            self._encoder = (replay, True)
        if replay is not None:
            replay()
        else:
            backend.encoder_pass()
            self._encoder = (None, True)
        backend.kv.advance_host()

    def _recording(self) -> bool:
        return self.graphs and not self.failed and not graphs_per_canvas()

    def _record(self, body: Callable[[], None]) -> Callable[[], None] | None:
        start = time.perf_counter()
        try:
            replay = recorder.record(body)
        except Exception as exc:  # noqa: BLE001 - what cannot be captured still runs eagerly
            self._fail(exc)
            return None
        self.captures += 1
        self.capture_seconds += time.perf_counter() - start
        return replay

    def _fail(self, exc: BaseException) -> None:
        self.failed = f"{type(exc).__name__}: {exc}"
        print(f"diffgen: warning: the denoising step could not be recorded as a CUDA graph ({self.failed}); "
              "running it eagerly (slower)", file=sys.stderr)

    # -- steps -----------------------------------------------------------------------------------

    def _context(self, settings: GenerationSettings, sampler: ExactSampler | FastSampler, clamp: tuple | None,
                 allowed: torch.Tensor | None) -> tuple[StepContext, StepGraph | None]:
        """The step context (and graph) for these settings, over the runner's own buffers (the
        caller copies each canvas's values in); kept when everything it reads is static."""
        n_steps = settings.max_denoising_steps
        static = self.backend.static and sampler is self.sampler
        key = (_settings_key(settings), clamp is not None, None if allowed is None else allowed.shape[0])
        if static and key in self._contexts:
            return self._contexts[key]
        schedule = TemperatureSchedule(settings.t_min, settings.t_max, n_steps)
        slots, length = self.backend.slots, self.canvas_length
        buffers: dict[str, torch.Tensor] = {"finished": self.finished, "canvas_index": self.canvas_index}
        if clamp is not None:
            buffers["clamp_tokens"] = torch.zeros((slots, length), dtype=torch.long, device=self.device)
            buffers["clamp_mask"] = torch.zeros((slots, length), dtype=torch.bool, device=self.device)
        if allowed is not None:
            buffers["allowed"] = torch.ones((allowed.shape[0], length, allowed.shape[2]), dtype=torch.bool,
                                            device=self.device)
        context = StepContext(
            decoder=self.backend.decoder(), sampler=sampler,
            temperatures=schedule(torch.arange(n_steps, 0, -1, dtype=torch.int32, device=self.device)),
            accept=entropy_bound_acceptance(settings.entropy_bound), stability_window=settings.stability_window,
            confidence_threshold=settings.confidence_threshold, embed_dtype=self.embed_dtype, **buffers)
        graph = None
        if self.graphs and sampler.capturable and not self.failed:
            graph = StepGraph(self.step_fn, (str(self.device), self.backend.slots,
                              id(self.loaded.model)), self.masked_first_step)
        if static:
            self._contexts[key] = (context, graph)
        return context, graph

    def denoise(self, settings: GenerationSettings, canvas: torch.Tensor, finished: torch.Tensor,
                canvas_index: torch.Tensor, forwards: torch.Tensor, *,
                sampler: ExactSampler | FastSampler | None = None,
                clamp: tuple[torch.Tensor, torch.Tensor] | None = None, allowed: torch.Tensor | None = None,
                check_every: int = FAST_CHECK_EVERY, stop_finished: bool = True) -> Iterator[tuple[int, StepState]]:
        """Denoise one canvas: yields ``(steps done, state)`` after every step, until every row
        stopped (asked every ``check_every`` steps and at the last) or the step budget is spent.

        ``canvas`` ``(slots, C)``: the starting tokens; ``finished`` ``(slots,)``: rows that draw
        nothing (ended, or empty slots); ``canvas_index`` (0-d or ``(slots,)``): each row's canvas;
        ``forwards``: decoder passes so far per row. ``sampler``: default the runner's fast sampler.
        ``clamp`` = ``(tokens, mask)`` and ``allowed`` are this canvas's constraints
        (:class:`~diffgen.denoise.step.StepContext`). ``stop_finished``: rows in ``finished``
        count as stopped (False for the reference's global-generator sampler, which keeps
        denoising them). A state yielded from a replayed graph is overwritten by the next step:
        copy what you keep (:func:`~diffgen.denoise.step.clone_state`).
        """
        sampler = sampler if sampler is not None else self.sampler
        context, graph = self._context(settings, sampler, clamp, allowed)
        self.finished.copy_(finished)
        self.canvas_index.copy_(canvas_index.expand_as(self.canvas_index))
        if clamp is not None:
            context.clamp_tokens.copy_(clamp[0])
            context.clamp_mask.copy_(clamp[1])
        if allowed is not None:
            context.allowed.copy_(allowed)
        state = initial_state(context, canvas, forwards)
        per_canvas = graph is not None and (not self.backend.static or graphs_per_canvas())
        if graph is not None:
            graph.begin_canvas(state)
        n_steps = settings.max_denoising_steps
        try:
            for steps in range(1, n_steps + 1):
                state = self._step(graph, state, context)
                yield steps, state
                done = state.stopped | context.finished if stop_finished else state.stopped
                if (steps % check_every == 0 or steps == n_steps) and bool(done.all()):
                    break
        finally:
            if per_canvas:
                graph.release()

    def _step(self, graph: StepGraph | None, state: StepState, context: StepContext) -> StepState:
        if graph is None or self.failed:
            return self.step_fn(state, context)
        if graph.replay is None:
            if not graph.ready(state):
                return self.step_fn(state, context)
            start = time.perf_counter()
            try:
                graph.record(state, context)
            except Exception as exc:  # noqa: BLE001 - a step that cannot be captured still runs eagerly
                self._fail(exc)
                return self.step_fn(state, context)
            self.captures += 1
            self.capture_seconds += time.perf_counter() - start
        graph.replay()
        return graph.static


def runner_for(loaded: LoadedModel, slots: int, capacity: int, *, graphs: bool,
               step_fn: Callable[..., StepState] | None = None) -> CanvasRunner:
    """A pooled runner over a :class:`~diffgen.denoise.backends.StaticBackend` with ``slots`` rows
    and room for ``capacity`` positions (its buffers and graphs kept for later generations)."""
    from diffgen.denoise.backends import StaticBackend

    model = loaded.model
    pool: OrderedDict = model.__dict__.setdefault("_diffgen_runners", OrderedDict())
    # A recorded graph holds the kernels chosen when it was recorded: the DIFFGEN_* knobs that pick
    # kernels (read at call time) are part of what it is.
    knobs = tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith("DIFFGEN_")))
    # So is what recorded it (:data:`recorder`, which the tests replace).
    key = (slots, capacity, graphs, recorder if graphs else None, step_fn, knobs)
    runner = pool.get(key)
    if runner is None or runner.loaded is not loaded:
        while len(pool) >= POOL_SIZE:
            pool.popitem(last=False)
        runner = CanvasRunner(loaded, StaticBackend(loaded, slots, capacity), graphs=graphs, step_fn=step_fn)
        pool[key] = runner
    pool.move_to_end(key)
    return runner
