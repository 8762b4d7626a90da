"""On a CUDA GPU only (skipped elsewhere; the CPU tests in test_fast.py run the same replay logic
through an eager recorder): the real CUDA-graph path over several canvases."""

from __future__ import annotations

import pytest
import torch

from diffgen.denoise.loop import Execution, generate, stream
from diffgen.prompt import encode
from tests.conftest import SHARP_SETTINGS, hold_at_boundaries

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def sharp_cuda(sharp_checkpoint):
    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan

    return load(str(sharp_checkpoint), LoadPlan("cuda", "bfloat16"), progress=False)


def _tokens(generation) -> list:
    for _ in generation:
        pass
    return [c.token_ids for c in generation.result.completions]


def test_graphs_are_recorded_once_per_process_and_match_eager(sharp_cuda):
    """The step and the encoder pass are recorded once (not per canvas) and replayed for every
    later canvas and generation, with the tokens of eager steps."""
    ids = [encode(sharp_cuda.tokenizer, p) for p in ("Why is the sky blue?", "hi")]
    settings = sharp_cuda.defaults.replace(max_new_tokens=64, seed=3, **SHARP_SETTINGS)
    eager = _tokens(stream(sharp_cuda, ids, settings, execution=Execution(exact=False, graphs=False), observe=False))
    first = stream(sharp_cuda, ids, settings, execution=Execution(exact=False, graphs=True), observe=False)
    assert _tokens(first) == eager
    assert first.runner.failed is None and first.runner.captures == 2
    again = stream(sharp_cuda, ids, settings, execution=Execution(exact=False, graphs=True), observe=False)
    assert _tokens(again) == eager
    assert again.runner is first.runner and again.runner.captures == 2


def batched_tokens(loaded, *, graphs: bool) -> tuple[list, object]:
    """Three held rows through the continuous batcher (two of them multi-canvas); their tokens and
    the batcher's canvas runner."""
    import threading

    from diffgen.denoise import batcher as batcher_mod

    batcher = batcher_mod.Batcher(loaded, max_batch=4, graphs=graphs)
    try:
        rows = [loaded.defaults.replace(max_new_tokens=tokens, seed=seed, **SHARP_SETTINGS)
                for seed, tokens in ((1, 48), (2, 16), (3, 64))]
        prompts = [encode(loaded.tokenizer, text) for text in ("Why is the sky blue?", "hi", "Tell me a story")]
        done: list[dict] = [{} for _ in rows]
        hold = threading.Event()
        hold.set()
        hold_at_boundaries(batcher, hold.is_set)  # all three are queued before the first canvas
        tickets = [batcher.submit(p, [row], lambda item, d=d: d.update({type(item).__name__: item}))
                   for p, row, d in zip(prompts, rows, done)]
        hold.clear()
        for ticket in tickets:
            ticket.wait()
        return [d["Done"].completion.token_ids for d in done], batcher.runner
    finally:
        batcher.close(wait=True)


def test_the_batcher_records_its_graphs_once_and_matches_its_eager_self(sharp_cuda):
    eager, _ = batched_tokens(sharp_cuda, graphs=False)
    graphed, runner = batched_tokens(sharp_cuda, graphs=True)
    assert graphed == eager and all(eager)
    assert runner.failed is None and runner.captures == 2
