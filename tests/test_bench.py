"""diffgen bench on the CPU: the numbers it promises, side by side with transformers."""

import json

import pytest

from typer.testing import CliRunner

from diffgen.cli.app import app

runner = CliRunner()


@pytest.fixture
def tiny_config_json(tmp_path):
    from devtools.tiny import tiny_config

    path = tmp_path / "config.json"
    path.write_text(tiny_config().to_json_string())
    return path
QUICK = ["--steps", "3", "--canvases", "2", "--reps", "1", "--prompt-tokens", "8"]


def test_bench_random_tiny_with_the_reference_in_json(tiny_config_json):
    result = runner.invoke(app, ["bench", "--random-config", str(tiny_config_json), "--compare-reference", "--json", *QUICK])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("median_step_ms", "prefill_ms", "first_call_s", "tokens_per_s_canvas", "tokens_per_s_e2e",
                "e2e_step_ms", "reference_e2e_step_ms", "ratio_to_reference", "torch", "transformers"):
        assert key in data
    assert data["sampler"] == "exact" and data["steps"] == 3 and data["canvases"] == 2
    assert data["ratio_to_reference"] == data["e2e_step_ms"] / data["reference_e2e_step_ms"] > 0
    assert data["tokens_per_s_e2e"] > 0 and data["median_step_ms"] > 0


def test_bench_a_checkpoint_with_the_fast_sampler(tiny_checkpoint):
    result = runner.invoke(app, ["bench", "-m", str(tiny_checkpoint), "--fast", *QUICK])
    assert result.exit_code == 0, result.stderr
    assert "fast sampler" in result.stdout and "median step" in result.stdout


def test_bench_needs_exactly_one_model_source(tiny_checkpoint):
    assert runner.invoke(app, ["bench"]).exit_code == 2
    both = runner.invoke(app, ["bench", "-m", str(tiny_checkpoint), "--random-config", "real"])
    assert both.exit_code == 2 and "exactly one" in both.stderr


def test_bench_real_size_is_refused_where_it_cannot_fit():
    result = runner.invoke(app, ["bench", "--random-config", "real", "--device", "cpu", "--max-memory", "8GB"])
    assert result.exit_code == 2 and "needs" in result.stderr


def test_random_models_are_built_in_the_plans_dtype(tiny_config_json):
    import torch

    from diffgen.denoise.bench import random_model
    from diffgen.planning.plan import LoadPlan

    loaded = random_model(str(tiny_config_json), LoadPlan("cpu", "bfloat16"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    layers = zip(loaded.model.model.encoder.language_model.layers, loaded.model.model.decoder.layers)
    assert all(e.experts.down_proj is d.experts.down_proj for e, d in layers)
