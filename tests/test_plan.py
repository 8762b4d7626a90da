"""The memory plan from config.json alone, and choosing a scheme that fits."""

import json
from pathlib import Path

import pytest

from diffgen.planning import plan, sizes
from diffgen.errors import UsageError
from diffgen.planning.plan import Estimate
from diffgen.planning.sizes import GB

REAL_CONFIG = json.loads((Path(__file__).parent.parent / "diffgen" / "data" / "diffusiongemma-26b-a4b-config.json").read_text())


@pytest.fixture(scope="module")
def real_counts():
    return sizes.count_parameters(REAL_CONFIG)


def test_real_model_parameter_count(real_counts):
    assert real_counts.total == pytest.approx(25.82e9, rel=0.005)
    experts = sum(e * o * i for e, o, i in real_counts.experts)
    assert experts == pytest.approx(22.84e9, rel=0.005)
    assert len(real_counts.layers) == 30


@pytest.mark.parametrize("scheme, expected, tolerance", [
    ("bf16", 51.6, 0.02), ("fp8", 28.8, 0.02), ("int8", 28.8, 0.02), ("nf4", 18.8, 0.02), ("nf4-all", 16.4, 0.02),
])
def test_real_model_weight_memory_per_scheme(real_counts, scheme, expected, tolerance):
    assert sizes.weight_bytes(real_counts, scheme, "bfloat16") / GB == pytest.approx(expected, rel=tolerance)


def test_real_model_runtime_at_8k():
    parts = sizes.runtime_bytes(REAL_CONFIG, "bfloat16", context=8192, batch=1, device="cuda:0")
    gib = {k: v / 1024**3 for k, v in parts.items()}
    assert gib["kv"] == pytest.approx(0.35, abs=0.05)
    assert gib["canvas"] == pytest.approx(0.8, abs=0.1)  # bf16 logits buffers of the fast step
    assert 2.0 < gib["prefill"] < 3.0
    assert sum(gib.values()) == pytest.approx(4.0, abs=0.3)
    two_rows = sizes.runtime_bytes(REAL_CONFIG, "bfloat16", context=8192, batch=2, device="cuda:0")
    assert two_rows["canvas"] == 2 * parts["canvas"]
    assert two_rows["prefill"] < 1.2 * parts["prefill"]  # the score workspace is reused, not per row


def test_batch_8_keeps_bf16_on_an_80_gb_card():
    """The GPU check's batch row: 8 rows of the released model stay in bf16 on an H100."""
    counts = sizes.count_parameters(REAL_CONFIG)
    budget = 78 * 2**30
    table8 = plan.estimates(REAL_CONFIG, counts, device="cuda:0", dtype="bfloat16", budget=budget, batch=8)
    assert plan.choose(table8, "auto", budget).scheme == "bf16"


def table(budget, fp8=True, device="cuda:0"):
    class Profile:
        devices = [type("D", (), {"fp8": fp8})()]

    counts = sizes.count_parameters(REAL_CONFIG)
    return plan.estimates(REAL_CONFIG, counts, device=device, dtype="bfloat16", budget=budget, hardware=Profile())


@pytest.mark.parametrize("budget_gb, chosen", [(75, "bf16"), (40, "fp8"), (24, "nvfp4"), (22, "nf4-all")])
def test_auto_picks_the_best_quality_that_fits(budget_gb, chosen):
    assert plan.choose(table(budget_gb * GB), "auto", budget_gb * GB).scheme == chosen


def test_no_fp8_before_ada_so_auto_takes_int8():
    estimates = table(40 * GB, fp8=False)
    assert not next(e for e in estimates if e.scheme == "fp8").available
    assert plan.choose(estimates, "auto", 40 * GB).scheme == "int8"


def test_nothing_fits_is_refused_naming_the_nearest_option():
    with pytest.raises(UsageError) as info:
        plan.choose(table(12 * GB), "auto", 12 * GB)
    message = str(info.value)
    assert "nf4-all" in message and "--offload" in message


def test_a_requested_scheme_that_does_not_fit_names_one_that_does():
    with pytest.raises(UsageError) as info:
        plan.choose(table(24 * GB), "bf16", 24 * GB)
    assert "--quant nvfp4 fits" in str(info.value)


def test_offload_is_the_explicit_last_resort_and_keeps_layer_pairs_together():
    counts = sizes.count_parameters(REAL_CONFIG)
    estimates = plan.estimates(REAL_CONFIG, counts, device="cuda:0", dtype="bfloat16", budget=15 * GB)
    chosen = plan.choose(estimates, "auto", 15 * GB, offload=True)
    assert chosen.scheme == "bf16"
    load_plan = plan.make_plan(chosen, "cuda:0", "bfloat16", 15 * GB, counts)
    mapping = dict(load_plan.device_map)
    assert load_plan.offload_bytes > 0 and mapping[""] == "cuda:0"
    offloaded = {k.rsplit(".", 1)[1] for k, v in mapping.items() if v == "cpu" and "decoder" in k}
    assert offloaded == {k.rsplit(".", 1)[1] for k, v in mapping.items() if v == "cpu" and "encoder" in k}
    assert "29" in offloaded and "0" not in offloaded


def test_quantised_offload_is_refused_naming_the_scheme_that_can_offload():
    estimate = Estimate("nf4", 30 * GB, 5 * GB, fits=False)
    with pytest.raises(UsageError) as info:
        plan.make_plan(estimate, "cuda:0", "bfloat16", 20 * GB, sizes.count_parameters(REAL_CONFIG))
    assert info.value.retry == (("--quant", "bf16"),)


def test_offload_on_the_cpu_is_refused_without_suggesting_it_again():
    estimate = Estimate("fp32", 30 * GB, 5 * GB, fits=False)
    with pytest.raises(UsageError) as info:
        plan.make_plan(estimate, "cpu", "float32", 20 * GB, sizes.count_parameters(REAL_CONFIG))
    assert "only moves layers from a CUDA GPU" in str(info.value) and not info.value.retry


@pytest.mark.parametrize("text, expected", [
    ("20GB", 20 * 1000**3), ("18.5GiB", int(18.5 * 1024**3)), ("512MB", 512 * 1000**2), ("1024", 1024),
    ("4 gib", 4 * 1024**3),
])
def test_parse_size(text, expected):
    assert plan.parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(UsageError):
        plan.parse_size("lots")


@pytest.mark.parametrize("scheme", ["fp32", "bf16", "int8", "fp8", "nf4", "nf4-all"])
def test_estimate_equals_resident_bytes_on_the_tiny_checkpoint(tiny_checkpoint, scheme):
    from diffgen.loading.loader import load, resident_bytes

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    counts = sizes.count_parameters(config)
    quant = "none" if scheme in sizes.UNQUANTISED else scheme
    dtype = sizes.UNQUANTISED.get(scheme, "float32")
    loaded = load(str(tiny_checkpoint), plan.LoadPlan("cpu", dtype, quant), progress=False)
    assert resident_bytes(loaded.model) == sizes.weight_bytes(counts, scheme, "float32")


def test_auto_batch_rows_fill_the_budget_beside_the_weights():
    counts = sizes.count_parameters(REAL_CONFIG)
    nf4 = next(e for e in plan.estimates(REAL_CONFIG, counts, device="cuda:0", dtype="bfloat16", budget=None)
               if e.scheme == "nf4")
    per_row = sizes.runtime_bytes(REAL_CONFIG, "bfloat16", batch=2, device="cuda:0")["canvas"] // 2
    one = nf4.weights + sum(sizes.runtime_bytes(REAL_CONFIG, "bfloat16", batch=1, device="cuda:0").values())
    assert plan.rows_that_fit(REAL_CONFIG, nf4, dtype="bfloat16", budget=one, device="cuda:0") == 1
    rows = plan.rows_that_fit(REAL_CONFIG, nf4, dtype="bfloat16", budget=40 * GB, device="cuda:0")
    assert 1 < rows < plan.MAX_AUTO_BATCH
    used = nf4.weights + sum(sizes.runtime_bytes(REAL_CONFIG, "bfloat16", batch=rows, device="cuda:0").values())
    more = nf4.weights + sum(sizes.runtime_bytes(REAL_CONFIG, "bfloat16", batch=rows + 1, device="cuda:0").values())
    assert used <= 40 * GB < more and per_row > 0
    assert plan.rows_that_fit(REAL_CONFIG, nf4, dtype="bfloat16", budget=10**15, device="cuda:0") == plan.MAX_AUTO_BATCH


def test_the_loader_accepts_an_offload_shaped_device_map(tiny_checkpoint):
    """On a GPU the top layer pairs would go to "cpu"; here every entry is the CPU, which checks
    that transformers takes the map's shape and that the encoder/decoder ties survive it."""
    from diffgen.loading.loader import load

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    mapping = plan.offload_device_map(sizes.count_parameters(config), "float32", "cpu", budget=1, runtime=0)
    assert mapping["model.decoder.layers.0"] == mapping["model.encoder.language_model.layers.0"] == "cpu"
    loaded = load(str(tiny_checkpoint), plan.LoadPlan("cpu", "float32", device_map=tuple(mapping.items())),
                  progress=False)
    layers = zip(loaded.model.model.encoder.language_model.layers, loaded.model.model.decoder.layers)
    assert all(e.experts.gate_up_proj is d.experts.gate_up_proj for e, d in layers)


@pytest.mark.parametrize("scheme", ["int8", "fp8", "nf4", "nf4-all"])
def test_quantised_storage_keeps_its_dtypes_under_bf16(tiny_checkpoint, scheme):
    """With bf16 weights (the GPU case) the quantised values keep their storage dtype and the
    scales stay fp32, so the estimate still equals the resident bytes."""
    import torch

    from diffgen.loading.loader import load, resident_bytes
    from diffgen.loading.quant import QuantizedStack

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    loaded = load(str(tiny_checkpoint), plan.LoadPlan("cpu", "bfloat16", scheme), progress=False)
    stacks = [m for m in loaded.model.modules() if isinstance(m, QuantizedStack)]
    storage = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}.get(scheme, torch.uint8)
    assert stacks and all(s.q.dtype == storage and s.scale.dtype == torch.float32 for s in stacks)
    assert resident_bytes(loaded.model) == sizes.weight_bytes(sizes.count_parameters(config), scheme, "bfloat16")


def test_without_a_gpu_offload_is_never_suggested():
    with pytest.raises(UsageError) as info:
        plan.choose(table(12 * GB), "auto", 12 * GB, can_offload=False)
    assert "--offload" not in str(info.value) and "--max-memory" in str(info.value)


def test_refusals_carry_the_flags_that_would_work():
    with pytest.raises(UsageError) as info:
        plan.choose(table(24 * GB), "bf16", 24 * GB)
    assert info.value.retry == (("--quant", "nvfp4"),)
    with pytest.raises(UsageError) as info:
        plan.choose(table(12 * GB), "nf4", 12 * GB)
    assert info.value.retry == (("--quant", "bf16"), ("--offload", None))
