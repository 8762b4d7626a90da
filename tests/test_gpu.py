"""On a CUDA GPU only (skipped elsewhere; the CPU tests in test_fast.py run the same replay logic
through an eager recorder): the real CUDA-graph path over several canvases."""

from __future__ import annotations

import pytest
import torch

from diffgen.denoise.loop import generate, stream
from diffgen.prompt import encode
from tests.conftest import SHARP_SETTINGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def sharp_cuda(sharp_checkpoint):
    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan

    return load(str(sharp_checkpoint), LoadPlan("cuda", "bfloat16"), progress=False)


def test_graphs_over_several_canvases_record_every_canvas_and_match_eager(sharp_cuda):
    """Regression: graphs sharing a memory pool across canvases tripped torch 2.11's allocator
    (an H200 run), and the step silently fell back to eager from the second canvas on."""
    ids = [encode(sharp_cuda.tokenizer, p) for p in ("Why is the sky blue?", "hi")]
    settings = sharp_cuda.defaults.replace(max_new_tokens=64, seed=3, **SHARP_SETTINGS)
    eager = generate(sharp_cuda, ids, settings, exact=False)
    for _ in range(2):  # the second generation records every canvas from its first step
        generation = stream(sharp_cuda, ids, settings, exact=False, graphs=True, observe=False)
        events = list(generation)
        assert generation.runner.failed is None
        assert generation.runner.captures == sum(1 for e in events if type(e).__name__ == "CanvasEvent")
        assert [c.token_ids for c in generation.result.completions] == [c.token_ids for c in eager.completions]


def batched_tokens(loaded, monkeypatch, *, graphs: bool, capture=None) -> tuple[list, list]:
    """Three held rows through the continuous batcher (two of them multi-canvas); their tokens and
    the graph runners the batcher made (one per canvas when ``graphs``)."""
    import threading

    from diffgen.denoise import batcher as batcher_mod
    from diffgen.denoise.step import GraphedSteps

    made = []

    class Recording(GraphedSteps):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(batcher_mod, "GraphedSteps", Recording)
    batcher = batcher_mod.Batcher(loaded, max_batch=4, graphs=graphs, capture=capture)
    try:
        rows = [loaded.defaults.replace(max_new_tokens=tokens, seed=seed, **SHARP_SETTINGS)
                for seed, tokens in ((1, 48), (2, 16), (3, 64))]
        prompts = [encode(loaded.tokenizer, text) for text in ("Why is the sky blue?", "hi", "Tell me a story")]
        done: list[dict] = [{} for _ in rows]
        hold = threading.Event()
        hold.set()
        batcher.hold = hold.is_set  # all three are queued before the first canvas
        tickets = [batcher.submit(p, [row], lambda item, d=d: d.update({item[0]: item}))
                   for p, row, d in zip(prompts, rows, done)]
        hold.clear()
        for ticket in tickets:
            ticket.wait()
        return [d["done"][2].token_ids for d in done], made
    finally:
        batcher.close(wait=True)


def test_the_batcher_replays_a_cuda_graph_per_canvas_and_matches_its_eager_self(sharp_cuda, monkeypatch):
    eager, none = batched_tokens(sharp_cuda, monkeypatch, graphs=False)
    graphed, runners = batched_tokens(sharp_cuda, monkeypatch, graphs=True)
    assert not none and graphed == eager and all(eager)
    assert runners and all(r.failed is None and r.captures == 1 for r in runners)
