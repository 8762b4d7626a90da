"""The loop's events and result, as consumers see them."""

import pytest
import torch

from diffgen.errors import PromptTooLongError, UsageError
from diffgen.denoise.loop import CanvasEvent, StepEvent, generate, stream


def _ids(loaded, text="Why is the sky blue?"):
    from diffgen.prompt import encode

    return encode(loaded.tokenizer, text)


def test_step_and_canvas_events_describe_the_run(tiny):
    settings = tiny.defaults.replace(max_new_tokens=32, max_denoising_steps=6, seed=0)
    generation = stream(tiny, [_ids(tiny), _ids(tiny, "hi")], settings)
    events = list(generation)
    steps = [e for e in events if isinstance(e, StepEvent)]
    canvases = [e for e in events if isinstance(e, CanvasEvent)]
    canvas_length = tiny.model.config.canvas_length
    assert [e.canvas for e in canvases] == [0, 1]
    assert [(e.canvas, e.step) for e in steps] == [(c, s) for c in (0, 1) for s in range(1, 7)]
    first = steps[0]
    assert first.temperature == pytest.approx(0.8) and steps[5].temperature == pytest.approx(0.4 + 0.4 / 6)
    assert first.accepted.shape == first.draft.shape == first.token_entropy.shape == (2, canvas_length)
    assert first.accepted.dtype == torch.bool and first.accepted.any(dim=-1).all()  # >= 1 token accepted per row
    assert first.mean_entropy.shape == first.finished.shape == (2,)
    assert all(a.elapsed <= b.elapsed for a, b in zip(events, events[1:]))
    # The committed canvas is the last step's draft (no EOS in this run's first canvas).
    assert torch.equal(canvases[0].tokens[~canvases[0].finished], steps[5].draft[~canvases[0].finished])
    assert generation.result.completions[0].stats.steps_per_canvas == (6, 6)


def test_observe_false_yields_only_canvas_events(tiny):
    settings = tiny.defaults.replace(max_new_tokens=16, max_denoising_steps=3, seed=0)
    events = list(stream(tiny, [_ids(tiny)], settings, observe=False))
    assert [type(e) for e in events] == [CanvasEvent]


def test_result_is_cut_to_max_new_tokens_and_reports_stats(tiny):
    settings = tiny.defaults.replace(max_new_tokens=5, max_denoising_steps=4, seed=9)
    result = generate(tiny, [_ids(tiny)], settings)
    completion = result.completions[0]
    assert len(completion.token_ids) <= 5
    stats = completion.stats
    assert stats.new_tokens == len(completion.token_ids)
    assert stats.prompt_tokens == len(_ids(tiny))
    assert stats.canvases == 1 and stats.seconds > 0
    assert stats.tokens_per_second == pytest.approx(stats.new_tokens / stats.seconds)
    assert stats.peak_memory_bytes is None  # the CPU reports none
    assert result.settings is settings


def test_same_seed_same_tokens_different_seed_different_tokens(tiny):
    settings = tiny.defaults.replace(max_new_tokens=16, max_denoising_steps=4)
    runs = [generate(tiny, [_ids(tiny)], settings.replace(seed=s)).completions[0].token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_result_before_the_run_is_an_error(tiny):
    generation = stream(tiny, [_ids(tiny)], tiny.defaults.replace(seed=0))
    with pytest.raises(RuntimeError):
        generation.result


def test_prompt_longer_than_the_context_is_refused_before_any_work(tiny):
    limit = tiny.model.config.text_config.max_position_embeddings
    with pytest.raises(PromptTooLongError) as info:
        stream(tiny, [[2] * (limit - 8)], tiny.defaults.replace(max_new_tokens=16))
    assert "context" in str(info.value)


def test_empty_prompt_is_refused(tiny):
    with pytest.raises(UsageError):
        stream(tiny, [[]], tiny.defaults)


def test_a_stability_threshold_beyond_the_steps_stops_as_the_steps_do_without_a_history_that_size(tiny):
    """A threshold of N steps or more is never met within N steps: capped at N, the run is the same
    and the history tensor stays N drafts long (a typed 10**12 used to ask for terabytes)."""
    ids = [_ids(tiny)]
    base = tiny.defaults.replace(max_new_tokens=32, max_denoising_steps=4, seed=5, confidence_threshold=1e9)
    huge = generate(tiny, ids, base.replace(stability_threshold=10**12)).completions[0]
    capped = generate(tiny, ids, base.replace(stability_threshold=4)).completions[0]
    assert huge.token_ids == capped.token_ids and huge.stats.steps_per_canvas == capped.stats.steps_per_canvas
    assert set(huge.stats.steps_per_canvas) == {4}  # never stable within 4 steps: every canvas ran them all
    assert base.replace(stability_threshold=10**12).stability_window == 4
    assert base.replace(stability_threshold=2).stability_window == 2
