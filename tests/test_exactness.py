"""The exactness contract: with the same seed on the CPU, diffgen's tokens are transformers'.

Each case runs transformers' own ``model.generate()`` (eager, dynamic cache) and diffgen's
loop on the same tiny random checkpoint, the same left-padded prompts and the same settings,
after the same ``torch.manual_seed``, and compares every committed canvas token for token.
Cases that need a particular event (an EOS inside a canvas, rows stopping at different
steps) search a few seeds and assert that the event really happened, so the test cannot pass
without covering it.
"""

from __future__ import annotations

import pytest
import torch

from diffgen.denoise.loop import CanvasEvent, StepEvent, stream
from tests.conftest import SHARP_SETTINGS

PROMPTS = [
    "Why is the sky blue?",
    "Summarise: diffusion models denoise a canvas of random tokens in parallel.",
    "hi",
]


def _encode(loaded, prompts, chat=True):
    from diffgen.prompt import encode

    return [encode(loaded.tokenizer, p, raw=not chat) for p in prompts]


def _reference(loaded, ids, settings):
    """transformers' generate() on the same left-padded batch; returns the new tokens."""
    longest = max(len(p) for p in ids)
    pad = settings.pad_token_id
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in ids])
    torch.manual_seed(settings.seed)
    kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "max_denoising_steps": settings.max_denoising_steps,
        "t_min": settings.t_min,
        "t_max": settings.t_max,
        "stability_threshold": settings.stability_threshold,
        "confidence_threshold": settings.confidence_threshold,
        "eos_token_id": list(settings.eos_token_ids),
        "pad_token_id": settings.pad_token_id,
    }
    from transformers import EntropyBoundSamplerConfig

    kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=settings.entropy_bound)
    out = loaded.model.generate(input_ids, attention_mask=mask, **kwargs)
    return out.sequences[:, longest:]


def _diffgen(loaded, ids, settings):
    generation = stream(loaded, ids, settings)
    events = list(generation)
    canvases = torch.cat([e.tokens for e in events if isinstance(e, CanvasEvent)], dim=-1)
    return generation.result, events, canvases


def _check_same(loaded, ids, settings):
    """Run both; assert identical canvases and completions; return diffgen's result and events."""
    expected = _reference(loaded, ids, settings)
    result, events, canvases = _diffgen(loaded, ids, settings)
    assert canvases.shape == expected.shape
    assert torch.equal(canvases, expected), "diffgen's committed canvases differ from transformers' generate()"
    eos = set(settings.eos_token_ids)
    for row, completion in enumerate(result.completions):
        tokens = expected[row].tolist()
        end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        assert list(completion.token_ids) == tokens[: min(end, settings.max_new_tokens)]
    return result, events


def test_batch_of_one_over_several_canvases(tiny):
    settings = tiny.defaults.replace(max_new_tokens=48, seed=11)
    result, events = _check_same(tiny, _encode(tiny, PROMPTS[:1]), settings)
    assert result.completions[0].stats.canvases == 3


def test_batch_with_left_padding_over_several_canvases(tiny):
    ids = _encode(tiny, PROMPTS)
    assert len({len(p) for p in ids}) == 3  # really different lengths: left padding is exercised
    settings = tiny.defaults.replace(max_new_tokens=40, seed=5)
    result, _ = _check_same(tiny, ids, settings)
    assert [c.stats.prompt_tokens for c in result.completions] == [len(p) for p in ids]


def test_raw_prompts_without_chat_template(tiny):
    settings = tiny.defaults.replace(max_new_tokens=32, seed=2)
    _check_same(tiny, _encode(tiny, ["one two three", "four"], chat=False), settings)


def test_eos_inside_a_canvas_pads_the_rest_and_ends_the_row(tiny):
    ids = _encode(tiny, PROMPTS)
    canvas = tiny.model.config.canvas_length
    for seed in range(12):
        settings = tiny.defaults.replace(max_new_tokens=64, seed=seed)
        result, events = _check_same(tiny, ids, settings)
        inside = [c for c in result.completions if c.finish_reason == "eos" and len(c.token_ids) % canvas != canvas - 1]
        if inside:
            break
    else:
        pytest.fail("no seed in 0..11 produced an EOS inside a canvas")
    last = [e for e in events if isinstance(e, CanvasEvent)][-1]
    for row, completion in enumerate(result.completions):
        if completion.finish_reason == "eos":
            assert last.finished[row]
            ended_at = len(completion.token_ids)
            committed = torch.cat([e.tokens[row] for e in events if isinstance(e, CanvasEvent)])
            assert (committed[ended_at + 1:] == settings.pad_token_id).all()


def test_adaptive_stopping_fires_at_different_steps_for_different_rows(sharp):
    ids = _encode(sharp, PROMPTS + ["diffusion"])
    for seed in range(8):
        settings = sharp.defaults.replace(max_new_tokens=32, seed=seed, **SHARP_SETTINGS)
        result, events = _check_same(sharp, ids, settings)
        first_canvas = [c.stats.steps_per_canvas[0] for c in result.completions]
        if len(set(first_canvas)) > 1 and min(first_canvas) < settings.max_denoising_steps:
            break
    else:
        pytest.fail("adaptive stopping never split the batch")
    # A row that stopped keeps its draft while the others go on denoising.
    steps = [e for e in events if isinstance(e, StepEvent) and e.canvas == 0]
    row = first_canvas.index(min(first_canvas))
    frozen = [e.draft[row] for e in steps[min(first_canvas) - 1:]]
    assert all(torch.equal(frozen[0], d) for d in frozen)
    assert all(bool(e.finished[row]) for e in steps[min(first_canvas) - 1:])


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_denoising_steps": 8, "t_min": 0.1, "t_max": 1.5, "entropy_bound": 0.5},
        {"max_denoising_steps": 12, "stability_threshold": 2, "confidence_threshold": 2.5, "entropy_bound": 3.0},
        {"max_denoising_steps": 6, "stability_threshold": 0, "confidence_threshold": 1.2, "entropy_bound": 8.0},
        {"max_new_tokens": 20, "max_denoising_steps": 10, "t_min": 0.0, "t_max": 0.3},
    ],
    ids=["short-schedule", "stability-2", "stability-0", "uneven-length"],
)
def test_non_default_settings(sharp, overrides):
    settings = sharp.defaults.replace(seed=3, **{"max_new_tokens": 40, **overrides})
    result, _ = _check_same(sharp, _encode(sharp, PROMPTS[:2]), settings)
    assert all(len(c.token_ids) <= settings.max_new_tokens for c in result.completions)


def test_adaptive_stopping_disabled_runs_every_step(tiny):
    settings = tiny.defaults.replace(max_new_tokens=16, max_denoising_steps=5, seed=1)
    from dataclasses import replace

    settings = replace(settings, stability_threshold=None, confidence_threshold=None)
    result, events = _check_same(tiny, _encode(tiny, PROMPTS[:2]), settings)
    assert [c.stats.steps_per_canvas for c in result.completions] == [(5,), (5,)]
