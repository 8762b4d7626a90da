"""Fixed-step timing of the generator, side by side with transformers' ``generate()``.

Adaptive stopping is off, so every canvas runs exactly ``steps`` denoising steps. The first run
(warm-up: kernel selection, caches, any capture) is timed apart; then ``reps`` runs are timed,
each twice: once with a device sync after every step (the per-step median) and once without
(end to end). ``--compare-reference`` runs transformers' ``generate()`` with the same model,
prompt and settings in the same process.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffgen.denoise.options import Execution

if TYPE_CHECKING:
    import torch
    from transformers import DiffusionGemmaConfig, PreTrainedTokenizerBase

    from diffgen.denoise.loop import Generation
    from diffgen.loading.loader import LoadedModel
    from diffgen.planning.plan import LoadPlan
    from diffgen.settings import GenerationSettings

REAL_CONFIG = Path(__file__).resolve().parents[1] / "data" / "diffusiongemma-26b-a4b-config.json"


class NumbersTokenizer:
    """Enough of a tokenizer for a random model: ids decode to their numbers."""

    unk_token_id = -1

    def convert_tokens_to_ids(self, token: str) -> int:
        return -1

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def random_tensors(config: DiffusionGemmaConfig, device: torch.device | str, seed: int = 0
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` for every unique weight of a random model (bf16, std 0.02,
    norms at 1), generated on ``device`` tensor by tensor, decoder-side names as checkpoints use."""
    import torch
    from accelerate import init_empty_weights
    from transformers import DiffusionGemmaForBlockDiffusion

    with init_empty_weights(include_buffers=False):
        model = DiffusionGemmaForBlockDiffusion(config)
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        name = name.replace("model.encoder.language_model.", "model.decoder.")
        if name.endswith(("norm.weight", "scale")):
            yield name, torch.ones(param.shape, dtype=torch.bfloat16, device=device)
        else:
            yield name, torch.randn(param.shape, dtype=torch.bfloat16, device=device, generator=generator) * 0.02


def random_config(name: str) -> DiffusionGemmaConfig:
    """``real`` (the released model's dimensions, shipped with diffgen) or the path of a config.json."""
    from transformers import DiffusionGemmaConfig

    from diffgen.errors import UsageError

    path = REAL_CONFIG if name == "real" else Path(name)
    try:
        return DiffusionGemmaConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--random-config {name!r}: not 'real' and not a readable config.json ({exc})") from exc


def random_model(name: str, plan: LoadPlan) -> LoadedModel:
    """A LoadedModel of random weights with the ``real`` dimensions (or a config.json's), loaded under ``plan``."""
    from diffgen.loading.loader import Checkpoint, LoadedModel
    from diffgen.settings import GenerationSettings
    from diffgen.loading.streaming import build_quantized

    config = random_config(name)
    model = build_quantized(config, random_tensors(config, plan.device), plan, source="random weights").eval()
    label = f"random-{Path(name).stem if name != 'real' else name}"
    return LoadedModel(model, NumbersTokenizer(), GenerationSettings(), Checkpoint(label, Path("."), False), plan)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_host_bytes() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def ordinary_token_ids(config: DiffusionGemmaConfig, tokenizer: PreTrainedTokenizerBase | NumbersTokenizer,
                       vocab: int) -> list[int]:
    """Token ids a random prompt may use, for any vocabulary size: not special tokens (the
    tokenizer's, and the config's image / audio / video placeholders, which would ask for pixels),
    from 200 up to 1000 where the vocabulary is that large (specials of the real and tiny
    vocabularies sit below 200), else from the whole vocabulary."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or () if isinstance(i, int)}
    for source in (config, getattr(config, "text_config", None)):
        for name, value in (vars(source).items() if source is not None else ()):
            if name.endswith(("_token_id", "_token_index", "_token_ids")):
                values = value if isinstance(value, (list, tuple)) else [value]
                special.update(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool))
    for low in (200, 0):
        pool = [i for i in range(low, min(vocab, 1000)) if i not in special]
        if pool:
            return pool
    return list(range(vocab))


def run(loaded: LoadedModel, *, steps: int = 16, prompt_tokens: int = 64, canvases: int = 2, batch: int = 1,
        execution: Execution = Execution(), compare_reference: bool = False, reps: int = 3,
        reference_cache: str = "dynamic", progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time the generator (and optionally the reference); return the numbers as a dict.

    ``execution``: how the loop runs (:class:`~diffgen.denoise.options.Execution`). ``progress`` is told each phase as it starts (``"warm-up (first call)"``, ``"timed run 1/3"``...).
    """
    say = progress or (lambda phase: None)
    import torch

    device = loaded.model.device
    settings, prompts = _workload(loaded, steps, prompt_tokens, canvases, batch)
    options = {"execution": execution}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    say("warm-up (first call)")
    first_call, generation = _end_to_end(loaded, prompts, settings, options)
    step_samples, e2e, firsts = [], [], []
    for rep in range(reps):
        say(f"timed run {rep + 1}/{reps}")
        step_times, first = _observed(loaded, prompts, settings, options, steps, canvases)
        step_samples += step_times
        firsts.append(first)
        seconds, generation = _end_to_end(loaded, prompts, settings, options)
        e2e.append(seconds)
    shape = {"steps": steps, "canvases": canvases, "canvas_length": int(loaded.model.config.canvas_length),
             "batch": batch, "prompt_tokens": prompt_tokens}
    result = _numbers(loaded, generation, shape, statistics.median(step_samples), statistics.median(e2e),
                      statistics.median(firsts), first_call)
    if compare_reference:
        say(f"transformers generate() ({reference_cache} cache), warm-up and {reps} timed runs")
        result.update(_reference(loaded, prompts, settings, reps, reference_cache))
        result["ratio_to_reference"] = result["e2e_step_ms"] / result["reference_e2e_step_ms"]
    return result


def _workload(loaded: LoadedModel, steps: int, prompt_tokens: int, canvases: int, batch: int
              ) -> tuple[GenerationSettings, list[list[int]]]:
    """Fixed-step settings (no adaptive stop, an EOS no token is) and ``batch`` random prompts (seed 0)."""
    import torch

    model = loaded.model
    canvas = int(model.config.canvas_length)
    vocab = int(model.config.text_config.vocab_size)
    settings = replace(loaded.defaults.replace(max_new_tokens=canvas * canvases, max_denoising_steps=steps, seed=0),
                       stability_threshold=None, confidence_threshold=None, eos_token_ids=(vocab + 1,))
    generator = torch.Generator().manual_seed(0)
    pool = ordinary_token_ids(model.config, loaded.tokenizer, vocab)
    prompts = [[pool[i] for i in torch.randint(len(pool), (prompt_tokens,), generator=generator).tolist()]
               for _ in range(batch)]
    return settings, prompts


def _observed(loaded: LoadedModel, prompts: list[list[int]], settings: GenerationSettings, options: dict[str, Any],
              steps: int, canvases: int) -> tuple[list[float], float]:
    """One run with a device sync after every step: the step times (within a canvas) and the time to the first step."""
    from diffgen.denoise.loop import StepEvent, stream

    device = loaded.model.device
    _sync(device)
    start = time.perf_counter()
    marks: list[float] = []
    first = None
    for event in stream(loaded, prompts, settings, **options):
        if isinstance(event, StepEvent):
            _sync(device)
            now = time.perf_counter()
            if first is None:
                first = now - start
            marks.append(now)
    _sync(device)
    per_canvas = [marks[i * steps:(i + 1) * steps] for i in range(canvases)]
    return [b - a for chunk in per_canvas for a, b in zip(chunk, chunk[1:])], first or 0.0


def _end_to_end(loaded: LoadedModel, prompts: list[list[int]], settings: GenerationSettings, options: dict[str, Any]
                ) -> tuple[float, Generation]:
    """One run without step events or syncs: its seconds and the generation (for what it ran on)."""
    from diffgen.denoise.loop import stream

    device = loaded.model.device
    _sync(device)
    start = time.perf_counter()
    generation = stream(loaded, prompts, settings, observe=False, **options)
    for _ in generation:
        pass
    _sync(device)
    return time.perf_counter() - start, generation


def _numbers(loaded: LoadedModel, generation: Generation, shape: dict[str, int], median_step: float, e2e_median: float,
             first_step: float, first_call: float) -> dict[str, Any]:
    """The result's numbers from the workload's ``shape`` and the medians, and what the last run ran on."""
    import torch
    import transformers

    device = loaded.model.device
    steps, canvases, canvas, batch = shape["steps"], shape["canvases"], shape["canvas_length"], shape["batch"]
    runner = generation.runner
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": loaded.checkpoint.name,
        "scheme": loaded.plan.scheme,
        "sampler": "exact" if generation.execution.exact else "fast",
        "graphs": generation.execution.graphs,
        "compiled": generation.execution.compile,
        "graph_captures": runner.captures if runner else 0,
        "capture_s": runner.capture_seconds if runner else 0.0,
        "graph_failure": runner.failed if runner else None,
        **shape,
        "median_step_ms": median_step * 1e3,
        "prefill_ms": max(0.0, first_step - median_step) * 1e3,
        "first_call_s": first_call,
        "e2e_s": e2e_median,
        "e2e_step_ms": e2e_median / (steps * canvases) * 1e3,
        "tokens_per_s_canvas": canvas * batch / (median_step * steps),
        "tokens_per_s_e2e": canvas * canvases * batch / e2e_median,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_host_bytes": _peak_host_bytes(),
    }


def _reference(loaded: LoadedModel, prompts: list[list[int]], settings: GenerationSettings, reps: int,
               cache: str) -> dict[str, Any]:
    import torch
    from transformers import EntropyBoundSamplerConfig

    model = loaded.model
    device = model.device
    input_ids = torch.tensor(prompts, device=device)
    kwargs = {"max_new_tokens": settings.max_new_tokens, "max_denoising_steps": settings.max_denoising_steps,
              "t_min": settings.t_min, "t_max": settings.t_max, "stability_threshold": None,
              "confidence_threshold": None, "eos_token_id": list(settings.eos_token_ids),
              "pad_token_id": settings.pad_token_id,
              "sampler_config": EntropyBoundSamplerConfig(entropy_bound=settings.entropy_bound)}
    if cache == "static":
        kwargs["cache_implementation"] = "static"

    def once() -> float:
        _sync(device)
        start = time.perf_counter()
        model.generate(input_ids, **kwargs)
        _sync(device)
        return time.perf_counter() - start

    first = once()
    times = [once() for _ in range(reps)]
    steps = settings.max_denoising_steps * (settings.max_new_tokens // int(model.config.canvas_length))
    return {"reference_cache": cache, "reference_first_call_s": first, "reference_e2e_s": statistics.median(times),
            "reference_e2e_step_ms": statistics.median(times) / steps * 1e3}


def table(result: dict[str, Any]) -> str:
    """A short human table of a result."""
    lines = [
        f"{result['device']}; torch {result['torch']}, transformers {result['transformers']}; {result['model']} "
        f"({result['scheme']}), {result['sampler']} sampler; batch {result['batch']}, {result['prompt_tokens']}-token "
        f"prompt, {result['canvases']} x {result['steps']} steps",
        f"{'median step':<26}{result['median_step_ms']:>10.2f} ms",
        f"{'end to end per step':<26}{result['e2e_step_ms']:>10.2f} ms",
        f"{'prefill':<26}{result['prefill_ms']:>10.2f} ms",
        f"{'first call (warm-up)':<26}{result['first_call_s']:>10.2f} s",
        f"{'tokens/s per canvas':<26}{result['tokens_per_s_canvas']:>10.1f}",
        f"{'tokens/s end to end':<26}{result['tokens_per_s_e2e']:>10.1f}",
    ]
    if result.get("peak_memory_bytes") is not None:
        lines.append(f"{'peak GPU memory':<26}{result['peak_memory_bytes'] / 2**30:>10.2f} GiB")
    if "ratio_to_reference" in result:
        kind = "compiled, static cache" if result["reference_cache"] == "static" else "eager"
        lines += [f"{'reference per step':<26}{result['reference_e2e_step_ms']:>10.2f} ms (generate(), {kind})",
                  f"{'reference first call':<26}{result['reference_first_call_s']:>10.2f} s",
                  f"{'ratio to reference':<26}{result['ratio_to_reference']:>10.2f}"]
    return "\n".join(lines)
