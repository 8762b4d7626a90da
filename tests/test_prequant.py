"""The published pre-quantised checkpoints load directly, exactly, and bad ones are refused in one line.

Tiny checkpoints in each published layout (ModelOpt NVFP4, compressed-tensors NVFP4 and FP8;
written by :mod:`tests.prequant_layouts` with power-of-two scales, so decoding is exact) must
give, on the CPU with the exact sampler, the very tokens transformers' ``generate()`` gives on a
plain checkpoint holding the decoded weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffgen.errors import NotACheckpointError, UsageError
from diffgen.loading import loader
from diffgen.planning import plan, sizes
from diffgen.planning.plan import LoadPlan
from diffgen.planning.sizes import GB, GiB
from tests.conftest import cli, run_cli
from tests.prequant_layouts import write
from tests.test_exactness import PROMPTS, _encode, _reference

LAYOUTS = ("modelopt-nvfp4", "ct-nvfp4", "ct-fp8")
LABELS = {"modelopt-nvfp4": "ModelOpt NVFP4", "ct-nvfp4": "compressed-tensors NVFP4", "ct-fp8": "compressed-tensors FP8"}
SCHEMES = {"modelopt-nvfp4": "nvfp4", "ct-nvfp4": "nvfp4", "ct-fp8": "fp8"}
REAL_CONFIG = json.loads((Path(__file__).parent.parent / "diffgen" / "data" / "diffusiongemma-26b-a4b-config.json")
                         .read_text())


@pytest.fixture(scope="module")
def layouts(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {name: write(tiny_checkpoint, root, name) for name in LAYOUTS}


def error_line(result) -> str:
    lines = [line for line in result.stderr.decode().splitlines() if line.startswith("diffgen: error:")]
    assert len(lines) == 1, result.stderr.decode()
    return lines[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_tokens_are_generates_on_the_decoded_weights(layouts, layout):
    from diffgen.denoise.loop import CanvasEvent, Execution, stream
    from diffgen.loading.quant import QuantizedExperts, QuantizedLinear

    quantised, plain = layouts[layout]
    ours = loader.load(str(quantised), LoadPlan("cpu", "float32"), progress=False)
    reference = loader.load(str(plain), LoadPlan("cpu", "float32"), progress=False)
    assert ours.plan.quant == SCHEMES[layout] and ours.plan.stored == LABELS[layout]
    for encoder_layer, decoder_layer, plain_layer in zip(ours.model.model.encoder.language_model.layers,
                                                         ours.model.model.decoder.layers,
                                                         reference.model.model.decoder.layers):
        experts = decoder_layer.experts
        assert isinstance(experts, QuantizedExperts) and encoder_layer.experts is experts
        for index in range(experts.num_experts):  # copied as stored: the decoded weights bit for bit
            assert torch.equal(experts.gate_up_proj.weight(index), plain_layer.experts.gate_up_proj[index])
            assert torch.equal(experts.down_proj.weight(index), plain_layer.experts.down_proj[index])
        q_proj = decoder_layer.self_attn.q_proj
        assert isinstance(q_proj, QuantizedLinear) == (layout == "ct-fp8")
        if layout == "ct-fp8":  # one module for both stacks; otherwise the tied weight, as transformers ties it
            assert encoder_layer.self_attn.q_proj is q_proj
        else:
            assert encoder_layer.self_attn.q_proj.weight is q_proj.weight
    ids = _encode(reference, PROMPTS)
    settings = reference.defaults.replace(max_new_tokens=32, seed=5)
    expected = _reference(reference, ids, settings)
    events = list(stream(ours, ids, settings, execution=Execution(exact=True)))
    assert torch.equal(torch.cat([e.tokens for e in events if isinstance(e, CanvasEvent)], dim=-1), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_run_on_a_published_layout_says_so_and_writes_no_quantised_cache(layouts, layout, diffgen_cache):
    quantised, plain = layouts[layout]
    args = ("--exact", "--seed", "3", "-n", "32", "--steps", "6", "Why is the sky blue?")
    ours, reference = cli("run", "-m", str(quantised), *args), cli("run", "-m", str(plain), *args)
    assert ours.returncode == 0, ours.stderr.decode()
    assert ours.stdout == reference.stdout and ours.stdout.strip()
    assert f"{SCHEMES[layout]} experts (rest float32), as stored ({LABELS[layout]} checkpoint)" in ours.stderr.decode()
    entries = list((diffgen_cache / "quantized").glob(f"{layout}-*")) if (diffgen_cache / "quantized").exists() else []
    assert entries == []


def test_quant_naming_another_scheme_is_refused_and_its_own_is_taken(layouts):
    quantised, _ = layouts["modelopt-nvfp4"]
    refused = cli("run", "-m", str(quantised), "--quant", "int8", "hi")
    assert refused.returncode == 2
    line = error_line(refused)
    assert "already quantised (ModelOpt NVFP4): --quant int8 cannot apply to it" in line
    taken = cli("run", "-m", str(quantised), "--quant", "nvfp4", "-n", "16", "--steps", "2", "hi")
    assert taken.returncode == 0, taken.stderr.decode()
    with pytest.raises(UsageError):
        loader.load(str(quantised), LoadPlan("cpu", "float32", "int8"), progress=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_info_names_the_format_and_plans_the_real_size(layouts, layout):
    quantised, _ = layouts[layout]
    result = cli("info", "-m", str(quantised), "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    assert data["format"] == {"label": LABELS[layout], "quant": SCHEMES[layout], "method": LABELS[layout].split()[0]
                              .replace("ModelOpt", "modelopt")}
    assert [row["quant"] for row in data["plans"]] == [SCHEMES[layout]] and data["chosen"] == SCHEMES[layout]
    loaded = loader.load(str(quantised), LoadPlan("cpu", "float32"), progress=False)
    assert data["plans"][0]["weights_gb"] == round(loader.resident_bytes(loaded.model) / GB, 3)
    text = cli("info", "-m", str(quantised), "--device", "cpu")
    assert f"format: {LABELS[layout]} checkpoint, pre-quantised" in text.stdout.decode().replace("\n", " ")


def test_a_hub_snapshot_of_a_published_layout_runs_offline(layouts, tmp_path):
    from tests.test_loader import hub_cache

    quantised, _ = layouts["ct-nvfp4"]
    hub_cache(tmp_path / "hub", "RedHatAI/tiny-NVFP4", quantised)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("run", "-m", "RedHatAI/tiny-NVFP4", "-n", "16", "--steps", "2", "hi", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert "as stored (compressed-tensors NVFP4 checkpoint)" in result.stderr.decode()


# -- bad inputs: one line each, before the model is built ------------------------------------------------


def _broken(layouts, tmp_path, layout, tensors=None, config=None, hf_quant=None):
    quantised, _ = layouts[layout]
    target = tmp_path / "broken"
    shutil.copytree(quantised, target)
    if tensors is not None:
        data = load_file(str(target / "model.safetensors"))
        save_file(tensors(data), str(target / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        config(data)
        (target / "config.json").write_text(json.dumps(data))
    if hf_quant is not None:
        data = json.loads((target / "hf_quant_config.json").read_text())
        hf_quant(data)
        (target / "hf_quant_config.json").write_text(json.dumps(data))
    return target


def _scale_of_wrong_shape(data):
    data["model.decoder.layers.0.experts.1.up_proj.weight_scale"] = torch.ones(16, 3).to(torch.float8_e4m3fn)
    return data


def _no_global_scale(data):
    del data["model.decoder.layers.0.experts.2.down_proj.weight_scale_2"]
    return data


def _odd_in(config):
    config["text_config"]["moe_intermediate_size"] = 17


def _unknown_algorithm(data):
    data["quantization"]["quant_algo"] = "W4A8_AWQ"


def _unknown_algorithm_config(config):
    config["quantization_config"]["quant_algo"] = "W4A8_AWQ"


def _mixed_formats(config):
    groups = config["quantization_config"]["config_groups"]
    groups["group_1"] = dict(groups["group_0"], format="float-quantized", targets=["Linear"])


BAD = {
    "scale of the wrong shape": ("modelopt-nvfp4", {"tensors": _scale_of_wrong_shape},
                                 "model.decoder.layers.0.experts.1.up_proj.weight_scale is F8_E4M3 [16, 3], but "
                                 "ModelOpt NVFP4 stores it as F8_E4M3 [16, 2]"),
    "odd in": ("ct-nvfp4", {"config": _odd_in}, "has rows of 17 weights, not a multiple of 16"),
    "missing global scale": ("modelopt-nvfp4", {"tensors": _no_global_scale},
                             "lacks 1 of the 135 tensors the model needs in the ModelOpt NVFP4 layout "
                             "(first: model.decoder.layers.0.experts.2.down_proj.weight_scale_2)"),
    "unknown quant_algo": ("modelopt-nvfp4", {"hf_quant": _unknown_algorithm, "config": _unknown_algorithm_config},
                           "ModelOpt quant_algo 'W4A8_AWQ' is not one diffgen reads"),
    "mixed formats": ("ct-nvfp4", {"config": _mixed_formats},
                      "mixed formats: float-quantized, nvfp4-pack-quantized"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_checkpoint_is_refused_in_one_line_before_the_model_is_built(layouts, tmp_path, monkeypatch, case):
    layout, changes, message = BAD[case]
    path = _broken(layouts, tmp_path, layout, **changes)
    result = cli("run", "-m", str(path), "hi")
    assert result.returncode == 1 and result.stdout == b""
    assert message in error_line(result)

    from diffgen.loading import streaming

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(streaming, "empty_quantized", built)
    with pytest.raises(NotACheckpointError) as info:
        loader.load(str(path), LoadPlan("cpu", "float32"), progress=False)
    assert message in str(info.value)


# -- planning ----------------------------------------------------------------------------------------------


class _Profile:
    def __init__(self, fp8=True):
        self.devices = [type("D", (), {"fp8": fp8})()]


def _machine(budget):
    from diffgen.loading.prepare import Machine

    return Machine("cuda:0", "bfloat16", _Profile(fp8=False), budget)


RTX_24GB = 24 * GiB - int(1.5 * GiB) - int(0.5 * GiB)  # a 24 GiB card driving a display: what is left to plan with


def test_the_nvfp4_checkpoint_fits_a_24_gb_rtx_card_at_8k_context():
    from diffgen.loading import prequant
    from diffgen.loading.prepare import plan_load

    config = dict(REAL_CONFIG, quantization_config={"quant_method": "modelopt", "quant_algo": "NVFP4"})
    fmt = prequant.detect(config)
    load_plan, chosen, budget = plan_load(config, device="cuda", quant="auto", max_memory=None, offload=False,
                                          where=_machine(RTX_24GB), fmt=fmt)
    assert load_plan.quant == "nvfp4" and load_plan.stored == "ModelOpt NVFP4"
    assert chosen.fits and 18.0 * GB < chosen.weights < 19.5 * GB  # the published checkpoint is 18.9 GB
    assert chosen.runtime >= 3 * GB and chosen.total <= budget


def test_auto_on_the_bf16_checkpoint_names_the_published_4_bit_one(capsys):
    from diffgen.loading.hub import DEFAULT_MODEL
    from diffgen.loading.prepare import plan_load

    load_plan, chosen, _ = plan_load(REAL_CONFIG, device="cuda", quant="auto", max_memory=None, offload=False,
                                     where=_machine(RTX_24GB), label=DEFAULT_MODEL)
    assert chosen.scheme == "nvfp4"
    err = capsys.readouterr().err
    assert "bf16 does not fit here" in err and "-m nvidia/diffusiongemma-26B-A4B-it-NVFP4" in err


@pytest.mark.parametrize("budget_gb, fp8, pick", [
    (75, True, "google/diffusiongemma-26B-A4B-it"),
    (40, True, "RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic"),
    (40, False, "nvidia/diffusiongemma-26B-A4B-it-NVFP4"),
    (24, True, "nvidia/diffusiongemma-26B-A4B-it-NVFP4"),
    (16, True, None),
])
def test_which_published_checkpoint_to_pick_for_which_card(budget_gb, fp8, pick):
    counts = sizes.count_parameters(REAL_CONFIG)
    table = plan.estimates(REAL_CONFIG, counts, device="cuda:0", dtype="bfloat16", budget=budget_gb * GB,
                           hardware=_Profile(fp8))
    choice = plan.published_choice(table)
    assert (choice[1] if choice else None) == pick


def test_the_fp8_checkpoint_on_a_card_without_fp8_names_the_nvfp4_one():
    from diffgen.loading import prequant
    from diffgen.loading.prepare import plan_load

    config = dict(REAL_CONFIG, quantization_config={"quant_method": "compressed-tensors", "format": "float-quantized"})
    with pytest.raises(UsageError) as info:
        plan_load(config, device="cuda", quant="auto", max_memory=None, offload=False,
                  where=_machine(48 * GB), fmt=prequant.detect(config), label="RedHatAI/x-FP8-dynamic")
    assert "is a compressed-tensors FP8 checkpoint, which cannot run on cuda:0" in str(info.value)
    assert "nvidia/diffusiongemma-26B-A4B-it-NVFP4" in str(info.value)
