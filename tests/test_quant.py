"""diffgen's own quantisation: formats, the encoder/decoder tie, and how close each scheme stays."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffgen.cli.app import app
from diffgen.loading.loader import load
from diffgen.planning.plan import LoadPlan
from diffgen.loading.quant import QuantizedExperts, QuantizedLinear, QuantizedStack, bnb_functional, nf4_dequantize_torch, \
    nf4_quantize_torch

runner = CliRunner()


def test_torch_nf4_is_bitsandbytes_nf4():
    if bnb_functional("cpu") is None:
        pytest.fail("bitsandbytes cannot quantise on this CPU; the project depends on it")
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    ours_packed, ours_absmax = nf4_quantize_torch(weight)
    assert torch.equal(ours_absmax, state.absmax.float())
    theirs = F.dequantize_4bit(packed, state)
    ours = nf4_dequantize_torch(ours_packed, ours_absmax, weight.shape, torch.float32)
    assert torch.equal(ours, theirs)


# Measured on these Gaussian matrices: int8 0.0066, fp8 0.026, nvfp4 0.095, nf4 0.092 relative error.
@pytest.mark.parametrize("scheme, bound", [("int8", 0.008), ("fp8", 0.04), ("nvfp4", 0.12), ("nf4", 0.12)])
def test_round_trip_error_per_scheme(scheme, bound):
    torch.manual_seed(1)
    stack = QuantizedStack(scheme, 2, 64, 128, torch.float32, "cpu")
    weights = torch.randn(2, 64, 128)
    for i in range(2):
        stack.store(i, weights[i])
    for i in range(2):
        error = (stack.weight(i) - weights[i]).norm() / weights[i].norm()
        assert error < bound


@pytest.mark.parametrize("scheme", ["int8", "nf4-all"])
def test_encoder_and_decoder_share_one_quantised_module(tiny_checkpoint, scheme):
    model = load(str(tiny_checkpoint), LoadPlan("cpu", "float32", scheme), progress=False).model
    for encoder_layer, decoder_layer in zip(model.model.encoder.language_model.layers, model.model.decoder.layers):
        assert isinstance(decoder_layer.experts, QuantizedExperts)
        assert encoder_layer.experts is decoder_layer.experts
        assert encoder_layer.self_attn.o_proj.weight is decoder_layer.self_attn.o_proj.weight if scheme == "int8" \
            else encoder_layer.self_attn.o_proj is decoder_layer.self_attn.o_proj
        if scheme == "nf4-all":
            assert isinstance(decoder_layer.mlp.down_proj, QuantizedLinear)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert model.model.encoder.language_model.embed_tokens.weight is model.model.decoder.embed_tokens.weight
    assert not isinstance(model.model.decoder.self_conditioning.down_proj, QuantizedLinear)  # stays unquantised


def _decoder_logits(loaded, prompt_ids):
    from transformers import DynamicCache

    from diffgen.denoise.loop import cache_keyword

    model = loaded.model
    kw = cache_keyword(model)
    torch.manual_seed(0)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad():
        model.model.encoder(input_ids=torch.tensor([prompt_ids]), **{kw: cache})
        canvas = torch.randint(0, model.config.text_config.vocab_size, (1, model.config.canvas_length))
        return model(decoder_input_ids=canvas, **{kw: cache}).logits[0]


# Thresholds from bench/quant_agreement.py on this checkpoint (measured: argmax agreement int8 1.000,
# fp8 0.938, nf4 0.688, nf4-all 0.375; relative logit error 0.0040, 0.0175, 0.203, 0.606; nvfp4, 2026-12:
# 0.750 and 0.084), with a margin for other CPUs' arithmetic. A 32-wide random model is a harsh case for
# 4-bit blocks.
@pytest.mark.parametrize("scheme, min_argmax, max_error", [
    ("int8", 0.95, 0.01), ("fp8", 0.85, 0.03), ("nvfp4", 0.6, 0.15), ("nf4", 0.55, 0.3), ("nf4-all", 0.25, 0.8),
])
def test_agreement_with_the_unquantised_model(tiny, tiny_checkpoint, scheme, min_argmax, max_error):
    from diffgen.prompt import encode

    prompt = encode(tiny.tokenizer, "Why is the sky blue?")
    reference = _decoder_logits(tiny, prompt)
    quantised = _decoder_logits(load(str(tiny_checkpoint), LoadPlan("cpu", "float32", scheme), progress=False), prompt)
    agreement = (quantised.argmax(-1) == reference.argmax(-1)).float().mean().item()
    error = ((quantised - reference).norm() / reference.norm()).item()
    assert agreement >= min_argmax and error <= max_error


def test_quantised_run_through_the_cli(tiny_checkpoint):
    result = runner.invoke(app, ["run", "-m", str(tiny_checkpoint), "--quant", "nf4", "--json", "--seed", "1",
                                 "-n", "8", "--steps", "2", "Hi"])
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) <= 8


def test_a_budget_too_small_is_refused_before_loading(tiny_checkpoint):
    result = runner.invoke(app, ["run", "-m", str(tiny_checkpoint), "--max-memory", "1MB", "Hi"])
    assert result.exit_code == 2
    assert "needs" in result.stderr and "usable" in result.stderr and "Traceback" not in result.stderr


def test_fp8_is_refused_where_the_gpu_lacks_it():
    from diffgen.planning import plan, sizes
    class Ampere:
        devices = [type("D", (), {"fp8": False})()]

    counts = sizes.ParameterCounts(((2, 64, 64),), (), 100, 0)
    table = plan.estimates({"text_config": {"hidden_size": 64, "num_attention_heads": 1, "head_dim": 64,
                                            "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 10}},
                           counts, device="cuda:0", dtype="bfloat16", budget=10**12, hardware=Ampere())
    with pytest.raises(Exception) as info:
        plan.choose(table, "fp8", 10**12)
    assert "8.9" in str(info.value)


def test_quantised_load_keeps_no_view_of_the_shards(tiny_checkpoint, monkeypatch):
    """Loaded weights are copies: nothing keeps a shard's memory map (and its pages) alive."""
    import safetensors

    handed_out = []
    real_safe_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, key):
            tensor = self.handle.get_tensor(key)
            handed_out.append(tensor.untyped_storage().data_ptr())
            return tensor

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    model = load(str(tiny_checkpoint), LoadPlan("cpu", "float32", "int8"), progress=False).model  # no dtype cast
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert handed_out and not kept & set(handed_out)
