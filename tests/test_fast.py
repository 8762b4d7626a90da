"""The fast sampler: same draws as the reference formulas given the same noise, fewer host syncs."""

from __future__ import annotations

import pytest
import torch

from diffgen.denoise.loop import generate, stream
from diffgen.prompt import encode
from diffgen.denoise.sampling import (
    fused_entropy,
    gumbel_argmax,
    gumbel_noise,
    reference_gumbel_sample,
    token_entropy,
)
from tests.conftest import SHARP_SETTINGS


def test_gumbel_argmax_is_the_reference_formula_given_the_same_noise():
    generator = torch.Generator().manual_seed(0)
    scaled = torch.randn(2, 64, 4096, generator=generator) * 6
    gumbel = gumbel_noise(scaled.shape, generator, scaled.device)
    assert torch.equal(gumbel_argmax(scaled, gumbel), reference_gumbel_sample(scaled, gumbel))


def test_gumbel_sampling_follows_the_softmax():
    generator = torch.Generator().manual_seed(1)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = 200_000
    scaled = logits.expand(draws, 4)
    counts = torch.bincount(gumbel_argmax(scaled, gumbel_noise(scaled.shape, generator, scaled.device)), minlength=4)
    expected = torch.softmax(logits, dim=0)
    assert torch.allclose(counts / draws, expected, atol=0.005)


def test_fused_entropy_matches_the_reference_within_tolerance():
    scaled = torch.randn(3, 16, 1000) * 5
    entropy, log_z = fused_entropy(scaled)
    torch.testing.assert_close(entropy, token_entropy(scaled), rtol=1e-4, atol=1e-4)  # float32 cancellation
    torch.testing.assert_close(log_z.squeeze(-1), torch.logsumexp(scaled, -1))


def _ids(loaded):
    return [encode(loaded.tokenizer, p) for p in ("Why is the sky blue?", "hi", "one two three", "diffusion")]


def test_fast_path_is_reproducible_with_its_seed(sharp):
    settings = sharp.defaults.replace(max_new_tokens=32, seed=7, **SHARP_SETTINGS)
    runs = [generate(sharp, _ids(sharp), settings.replace(seed=s), exact=False) for s in (7, 7, 8)]
    tokens = [[c.token_ids for c in r.completions] for r in runs]
    assert tokens[0] == tokens[1] != tokens[2]


def test_checking_for_the_end_less_often_changes_nothing(sharp):
    settings = sharp.defaults.replace(max_new_tokens=32, seed=3, **SHARP_SETTINGS)
    results = []
    for every in (1, 4, 7):
        generation = stream(sharp, _ids(sharp), settings, exact=False, check_every=every, observe=False)
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

    outside(model)
    outside(model.model.encoder)

    def counting_outside(self):
        nonlocal syncs
        syncs += counting_on[0]
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_outside)
    generation = stream(sharp, _ids(sharp)[:1], settings, exact=exact, observe=False)
    list(generation)
    monkeypatch.setattr(torch.Tensor, "__bool__", original)
    if exact:
        assert syncs >= 2 * 12  # the reference asks twice a step (any row stopped? all rows stopped?)
    else:
        # one ask every FAST_CHECK_EVERY (4) steps, plus a fixed few per canvas (mask building, commit)
        assert syncs <= 12 // 4 + 4
