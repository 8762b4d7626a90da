"""The fast step: reproducible per row from counter-based noise, few host syncs, capturable.

The kernels' own formulas are tested in tests/test_kernels_sampler.py.
"""

from __future__ import annotations

import pytest
import torch

from diffgen.denoise.loop import Execution, generate, stream
from diffgen.prompt import encode
from tests.conftest import SHARP_SETTINGS


FAST = Execution(exact=False)
GRAPHS = Execution(exact=False, graphs=True)


def _ids(loaded):
    return [encode(loaded.tokenizer, p) for p in ("Why is the sky blue?", "hi", "one two three", "diffusion")]


def test_fast_path_is_reproducible_with_its_seed(sharp):
    settings = sharp.defaults.replace(max_new_tokens=32, seed=7, **SHARP_SETTINGS)
    runs = [generate(sharp, _ids(sharp), settings.replace(seed=s), execution=FAST) for s in (7, 7, 8)]
    tokens = [[c.token_ids for c in r.completions] for r in runs]
    assert tokens[0] == tokens[1] != tokens[2]


def test_checking_for_the_end_less_often_changes_nothing(sharp):
    settings = sharp.defaults.replace(max_new_tokens=32, seed=3, **SHARP_SETTINGS)
    results = []
    for every in (1, 4, 7):
        generation = stream(sharp, _ids(sharp), settings, execution=Execution(exact=False, check_every=every),
                            observe=False)
        list(generation)
        results.append(generation.result)
    tokens = [[c.token_ids for c in r.completions] for r in results]
    assert tokens[0] == tokens[1] == tokens[2]
    steps = [c.stats.steps_per_canvas for c in results[0].completions]
    assert len({s[0] for s in steps}) > 1  # rows really stopped at different steps


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_host_syncs_per_step(sharp, monkeypatch, exact):
    settings = sharp.defaults.replace(max_new_tokens=16, max_denoising_steps=12, seed=1)
    from dataclasses import replace

    settings = replace(settings, stability_threshold=1, confidence_threshold=1e-9)  # never stops early
    syncs = 0
    original = torch.Tensor.__bool__

    model = sharp.model
    counting_on = [True]

    def outside(module):  # the model's own forward passes (eager MoE) are not the loop's syncs
        forward = module.forward

        def wrapped(*args, **kwargs):
            counting_on[0] = False
            try:
                return forward(*args, **kwargs)
            finally:
                counting_on[0] = True
        monkeypatch.setattr(module, "forward", wrapped)

    outside(model.model.decoder)
    outside(model.lm_head)
    outside(model.model.encoder)

    def counting_outside(self):
        nonlocal syncs
        syncs += counting_on[0]
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_outside)
    generation = stream(sharp, _ids(sharp)[:1], settings, execution=Execution(exact=exact), observe=False)
    list(generation)
    monkeypatch.setattr(torch.Tensor, "__bool__", original)
    if exact:
        assert 12 <= syncs < 2 * 12  # once a step (all rows stopped?); the reference also asks "any row stopped?"
    else:
        # one ask every FAST_CHECK_EVERY (4) steps, plus a fixed few per canvas (mask building, commit)
        assert syncs <= 12 // 4 + 4


def test_graphs_are_recorded_once_per_process_and_replay_every_later_canvas(sharp, eager_graphs):
    settings = sharp.defaults.replace(max_new_tokens=48, seed=5, **SHARP_SETTINGS)
    eager = generate(sharp, _ids(sharp), settings, execution=FAST)
    capture = eager_graphs
    generation = stream(sharp, _ids(sharp), settings, execution=GRAPHS, observe=True)
    events = list(generation)
    assert [c.token_ids for c in generation.result.completions] == [c.token_ids for c in eager.completions]
    canvases = sum(1 for e in events if type(e).__name__ == "CanvasEvent")
    assert canvases == 3
    # one graph for the step and one for the committed canvas's encoder pass, not one per canvas
    assert capture.recorded == generation.runner.captures == 2
    # a later generation records nothing: every step, each canvas's first too (masked
    # self-conditioning), and every encoder pass is a replay of the graphs recorded above
    replays = capture.replays
    again = stream(sharp, _ids(sharp), settings, execution=GRAPHS, observe=True)
    steps_again = sum(1 for e in again if type(e).__name__ == "StepEvent")
    assert capture.recorded == 2 and again.runner is generation.runner
    assert capture.replays - replays == steps_again + canvases - 1
    assert [c.token_ids for c in again.result.completions] == [c.token_ids for c in eager.completions]
    # events of replayed steps are copies: a later step never rewrites what a consumer kept
    steps = [e for e in events if type(e).__name__ == "StepEvent"]
    assert len({id(e.canvas_tokens) for e in steps}) == len(steps)
    assert any(not torch.equal(a.canvas_tokens, b.canvas_tokens) for a, b in zip(steps, steps[1:]))


def test_graphs_per_canvas_still_give_the_same_tokens(sharp, monkeypatch, eager_graphs):
    """``DIFFGEN_GRAPHS_PER_CANVAS=1`` (the A/B switch of bench/gpu_session.py) records anew per canvas."""
    monkeypatch.setenv("DIFFGEN_GRAPHS_PER_CANVAS", "1")
    settings = sharp.defaults.replace(max_new_tokens=48, seed=5, **SHARP_SETTINGS)
    eager = generate(sharp, _ids(sharp), settings, execution=FAST)
    capture = eager_graphs
    generation = stream(sharp, _ids(sharp), settings, execution=GRAPHS, observe=False)
    events = list(generation)
    canvases = sum(1 for e in events if type(e).__name__ == "CanvasEvent")
    assert [c.token_ids for c in generation.result.completions] == [c.token_ids for c in eager.completions]
    assert capture.recorded == canvases


def test_a_row_draws_the_same_tokens_alone_or_in_a_batch(sharp):
    settings = sharp.defaults.replace(max_new_tokens=32, **SHARP_SETTINGS)
    prompts = _ids(sharp)
    together = generate(sharp, prompts, settings, seeds=[11, 12, 13, 14], execution=FAST)
    for row, prompt in enumerate(prompts):
        alone = generate(sharp, [prompt], settings, seeds=[11 + row], execution=FAST)
        assert alone.completions[0].token_ids == together.completions[row].token_ids


def test_the_step_has_no_data_dependent_host_sync(sharp):
    """Tracing the whole fused step (decoder over the static cache, sampler, acceptance, stop) with
    dynamo in fullgraph mode fails on any .item(), bool(), nonzero() or other data-dependent
    break: what a CUDA graph could not replay."""
    from diffgen.denoise.step import denoise_step, initial_state

    settings = sharp.defaults.replace(max_new_tokens=16, seed=1)
    generation = stream(sharp, _ids(sharp)[:2], settings, execution=FAST, observe=False)
    list(generation)
    (context, _), = generation.runner._contexts.values()
    canvas = torch.zeros(2, generation.canvas_length, dtype=torch.long)
    state = denoise_step(initial_state(context, canvas, torch.zeros(2, dtype=torch.int)), context)
    compiled = torch.compile(lambda s: denoise_step(s, context), fullgraph=True, backend="eager")
    out = compiled(state)
    expected = denoise_step(state, context)
    assert torch.equal(out.canvas, expected.canvas) and torch.equal(out.stopped, expected.stopped)


def test_the_compiled_step_gives_the_tokens_of_the_eager_step(sharp, monkeypatch):
    """The compile plumbing (dynamo traces the whole step, guards hold across canvases and
    generations); the eager backend keeps the suite fast, bench/cpu_compare.py times inductor."""
    monkeypatch.setenv("DIFFGEN_COMPILE_BACKEND", "eager")
    settings = sharp.defaults.replace(max_new_tokens=32, seed=9, **SHARP_SETTINGS)
    eager = generate(sharp, _ids(sharp)[:2], settings, execution=FAST)
    for _ in range(2):
        generation = stream(sharp, _ids(sharp)[:2], settings, execution=Execution(exact=False, compile=True),
                            observe=False)
        list(generation)
        assert [c.token_ids for c in generation.result.completions] == [c.token_ids for c in eager.completions]
    with pytest.raises(Exception, match="fast sampler"):
        stream(sharp, _ids(sharp)[:1], settings, execution=Execution(exact=True, compile=True))
