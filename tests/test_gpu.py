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
