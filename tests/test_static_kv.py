"""The fast path's static-address KV cache and fused passes against transformers' own modules.

:class:`~diffgen.denoise.kv.StaticKV` keeps sliding-window layers in a ring buffer of its own; its
semantics must equal transformers' dynamic sliding cache (what ``generate()`` uses). The fused
decoder over it is compared with transformers' decoder over its ``DynamicCache`` on the same
prompt and the same committed canvases, past the sliding window (the tiny model's window is 64
positions, canvases are 16), logits to float32 rounding. The fast sampler is not the reference's
(Gumbel draws instead of ``multinomial``), so tokens are compared with ``generate()`` through the
logits the sampler reads, not through draws.
"""

from __future__ import annotations

import pytest
import torch

from diffgen.denoise.backends import DynamicBackend, StaticBackend
from diffgen.denoise.kv import StaticKV, bucket


def _prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(120, 500, (length - 1,), generator=generator).tolist()


def _dynamic_logits(tiny, prompt: list[int], canvases: list[torch.Tensor], probes: list[tuple]) -> list[torch.Tensor]:
    backend = DynamicBackend(tiny, [prompt], tiny.defaults.pad_token_id)
    backend.prefill()
    out = []
    for committed, (canvas, sc) in zip(canvases, probes):
        out.append(backend.decoder()(canvas, sc))
        backend.run_encoder(committed)
    return out


@pytest.mark.parametrize("lengths", [(40,), (40, 7)], ids=["one row", "two rows of other lengths"])
def test_the_fused_decoder_over_the_static_cache_equals_transformers_over_its_dynamic_cache(tiny, lengths):
    torch.manual_seed(0)
    length = int(tiny.model.config.canvas_length)
    vocab = int(tiny.model.config.get_text_config().vocab_size)
    prompts = [_prompt(n, seed) for seed, n in enumerate(lengths)]
    rounds = 6  # 40 + 6 x 16 = 136 positions: the 64-wide window wraps the ring twice
    committed = [torch.randint(120, 500, (len(prompts), length)) for _ in range(rounds)]
    probes = [(torch.randint(120, 500, (len(prompts), length)), torch.randn(len(prompts), length, vocab) * 3)
              for _ in range(rounds)]
    static = StaticBackend(tiny, len(prompts), bucket(max(lengths) + rounds * length, 64))
    static.load(prompts, range(len(prompts)), tiny.defaults.pad_token_id)
    with torch.no_grad():
        expected = [_dynamic_logits(tiny, prompt, [c[row:row + 1] for c in committed],
                                    [(canvas[row:row + 1], sc[row:row + 1]) for canvas, sc in probes])
                    for row, prompt in enumerate(prompts)]
        for index, (tokens, (canvas, sc)) in enumerate(zip(committed, probes)):
            got = static.decoder()(canvas, sc)
            for row in range(len(prompts)):
                torch.testing.assert_close(got[row:row + 1], expected[row][index], rtol=1e-4, atol=1e-4)
            static.tokens.copy_(tokens)
            static.encoder_pass()
            static.kv.advance_host()
    assert static.kv.lengths == [n + rounds * length for n in lengths]


def test_the_ring_holds_exactly_the_last_window_minus_one_positions(tiny):
    config = tiny.model.config.get_text_config()
    kv = StaticKV(config, 1, 256, 16, torch.float32, torch.device("cpu"))
    assert kv.window == 64 and kv.region["sliding_attention"] == 64  # 63 rounded up to 16s
    static = StaticBackend(tiny, 1, 256)
    static.load([_prompt(50, 1)], [0], tiny.defaults.pad_token_id)
    for _ in range(3):  # 50 + 48 = 98 positions
        static.tokens.copy_(torch.randint(120, 500, (1, 16)))
        static.encoder_pass()
        static.kv.advance_host()
    static.kv.begin_pass()  # what a decoder pass does first: the canvas columns get its positions
    masks = static.kv.decoder_masks(torch.float32)
    sliding = masks["sliding_attention"][0, 0, 0]
    positions = static.kv.positions["sliding_attention"][0]
    seen = sorted(positions[sliding == 0].tolist())
    # the cache part: positions 98 - 63 .. 97 (what a dynamic sliding layer keeps), then the canvas
    assert seen == list(range(98 - 63, 98)) + list(range(98, 98 + 16))
    full = masks["full_attention"][0, 0, 0]
    assert sorted(static.kv.positions["full_attention"][0][full == 0].tolist()) == list(range(98 + 16))


def test_a_larger_bucket_takes_over_rows_without_changing_them(tiny):
    small = StaticBackend(tiny, 2, 128)
    small.load([_prompt(30, 2), _prompt(90, 3)], [0, 1], tiny.defaults.pad_token_id)
    large = StaticBackend(tiny, 2, 256)
    large.kv.take_rows(small.kv)
    torch.manual_seed(1)
    canvas = torch.randint(120, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(large.decoder()(canvas, None), small.decoder()(canvas, None))


def test_bucket_rounds_up_to_whole_steps():
    assert bucket(1) == 1024 and bucket(1024) == 1024 and bucket(1025) == 2048
    assert bucket(65, 64) == 128
