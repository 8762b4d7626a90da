"""diffgen info (hardware and the plan table, no weights) and diffgen pull."""

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from diffgen.cli.app import app
from tests.test_loader import hub_cache

runner = CliRunner()
REAL_CONFIG = Path(__file__).parent.parent / "diffgen" / "data" / "diffusiongemma-26b-a4b-config.json"


def config_only(tmp_path):
    directory = tmp_path / "config-only"
    directory.mkdir()
    shutil.copy(REAL_CONFIG, directory / "config.json")
    return directory


def test_info_json_plans_the_real_model_from_config_alone(tmp_path):
    result = runner.invoke(app, ["info", "-m", str(config_only(tmp_path)), "--max-memory", "24GB", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["hardware"]["kind"] in {"cpu", "apple-mps", "consumer-rtx", "datacenter", "workstation",
                                        "dgx-spark", "unified-gpu"}
    assert data["budget_gb"] == 24.0 and data["budget_source"] == "--max-memory"
    plans = {p["quant"]: p for p in data["plans"]}
    assert set(plans) == {"fp32", "bf16", "fp16", "fp8", "int8", "nvfp4", "nf4", "nf4-all"}
    for row in plans.values():
        assert {"weights_gb", "runtime_gb", "total_gb", "fits"} <= set(row)
        assert row["total_gb"] == round(row["weights_gb"] + row["runtime_gb"], 3) or \
            abs(row["total_gb"] - row["weights_gb"] - row["runtime_gb"]) < 0.002
    assert data["chosen"] is None or plans[data["chosen"]]["fits"]


def test_info_table_marks_the_choice(tmp_path):
    result = runner.invoke(app, ["info", "-m", str(config_only(tmp_path)), "--max-memory", "200GB"],
                           env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.stderr
    assert "← auto" in result.stdout and "nf4-all" in result.stdout and "usable" in result.stdout


def test_info_without_a_model_shows_the_machine():
    result = runner.invoke(app, ["info", "--json"])
    data = json.loads(result.stdout)
    assert data["plans"] == [] and data["hardware"]["devices"][0]["usable"] >= 0


def test_info_of_a_hub_id_in_the_cache(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub_cache(tmp_path, "acme/tiny", tiny_checkpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    result = runner.invoke(app, ["info", "-m", "acme/tiny", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["chosen"] == "fp32"


def test_pull_offline_without_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    result = runner.invoke(app, ["pull", "acme/absent", "--offline"])
    assert result.exit_code == 1 and "offline" in result.stderr and "Traceback" not in result.stderr


def test_pull_of_a_cached_model_offline_prints_its_snapshot(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = hub_cache(tmp_path, "acme/tiny", tiny_checkpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    result = runner.invoke(app, ["pull", "acme/tiny", "--offline"])
    assert result.exit_code == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot


def test_pull_refuses_a_path(tmp_path):
    result = runner.invoke(app, ["pull", str(tmp_path)])
    assert result.exit_code == 1 and "not a Hub id" in result.stderr


def test_run_plans_from_config_json_before_fetching_weights(tmp_path, monkeypatch):
    """A Hub model of which only config.json is known is refused by the plan before any download."""
    import huggingface_hub.constants

    hub_cache(tmp_path / "hub", "acme/big", config_only(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = runner.invoke(app, ["run", "-m", "acme/big", "--max-memory", "10GB", "Hi"])
    assert result.exit_code == 2 and "needs" in result.stderr and "nf4-all" in result.stderr
