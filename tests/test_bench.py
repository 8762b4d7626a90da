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


# bench/gpu_session.py: the one-call GPU session (issue 18). Its dry run on the CPU, a few phases.

def _gpu_session():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.py"
    spec = importlib.util.spec_from_file_location("gpu_session_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_session_dry_run_writes_json_per_phase_and_prints_the_table_last(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.py"
    env = {k: v for k, v in os.environ.items() if k != "OUT" and not k.startswith("DIFFGEN_")}
    done = subprocess.run(
        [sys.executable, str(script), "--config", "tiny", "--device", "cpu", "--phases", "1-3,7,8", "--steps", "4",
         "--canvases", "1", "--prompt-tokens", "8", "--variants", "unfused,graphs off", "--reference", "eager",
         "--kernel-count-timeout", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_session.json").read_text())
    assert {k: v["status"] for k, v in data["phases"].items()} == {k: "ok" for k in ("0", "1", "2", "3", "7", "8", "9")}
    assert data["env"]["card"] == "cpu" and data["env"]["torch"] == torch.__version__
    assert set(data["env"]["knobs_read_by_diffgen"]) >= {"DIFFGEN_FUSED", "DIFFGEN_CUDA_GRAPHS"}
    assert data["floor"]["copy_bytes_per_s"] > 0 and data["floor"]["floor_ms"]["bf16"] > 0
    rows = {row["label"]: row for row in data["rows"]}
    new = rows["bf16 b1 new path"]
    assert new["phase"] == 2 and new["median_step_ms"] > 0 and new["e2e_step_ms"] > 0 and new["steps"] == 4
    assert new["env"] == {"DIFFGEN_FUSED": "1", "DIFFGEN_GRAPHS_PER_CANVAS": "0"} and new["reference_e2e_step_ms"] > 0
    assert all(("median_step_ms" in r) != ("skipped" in r or "error" in r) for r in data["rows"])
    assert [r["label"] for r in data["rows"] if r["phase"] == 2] == ["bf16 b1 new path", "bf16 b1 unfused",
                                                                     "bf16 b1 graphs off"]
    assert rows["bf16 b8 new path"]["batch"] == 8 and data["batch"]["ratio_e2e"] > 0
    assert [t["test"].split("::")[0] for t in data["tests"]] == ["test_gpu.py"] * len(data["tests"]) and data["tests"]
    if not torch.cuda.is_available():
        assert {t["status"] for t in data["tests"]} == {"skipped"}
    assert data["kernel_count"]["schemes"]["bf16"]["kernels"] > 0
    assert data["kernel_count"]["kernel_count_py"] in ({"skipped": "--kernel-count-timeout 0"},
                                                       {"skipped": "bench/kernel_count.py does not exist yet"})
    assert len(data["targets"]) == 7 and all(t["status"] in ("PASS", "FAIL") or t["status"].startswith("n/a")
                                             for t in data["targets"])
    # The table is the whole of stdout (progress goes to stderr), the targets last, and saved beside the JSON.
    table = done.stdout.strip()
    assert table.startswith("gpu_session: cpu") and "DRY RUN" in table and "bf16 b1 new path" in table
    assert table.splitlines()[-8] == "targets (issue 18 §5)"
    assert table.splitlines()[-1].split()[-1] in ("PASS", "FAIL") or "n/a" in table.splitlines()[-1]
    assert (tmp_path / "gpu_session.txt").read_text().strip() == table
    assert "phase 2 (bf16 step" in (tmp_path / "gpu_session.log").read_text() and "phase 2" in done.stderr


def test_gpu_session_runs_pytest_style_tests_without_pytest(tmp_path):
    import os
    import sys

    gs = _gpu_session()
    (tmp_path / "conftest.py").write_text(
        "import os\nimport pytest\n\n"
        "@pytest.fixture(scope='session', autouse=True)\ndef marker(tmp_path_factory):\n"
        "    path = tmp_path_factory.mktemp('marker')\n    yield path\n"
        f"    open({str(tmp_path / 'teardown')!r}, 'w').write('done')\n\n"
        "@pytest.fixture(scope='module')\ndef shared(marker):\n    return {'calls': 0}\n")
    (tmp_path / "test_fake.py").write_text(
        "import os\nimport pytest\n\npytestmark = pytest.mark.skipif(False, reason='never')\n\n"
        "def test_fixtures(tmp_path, monkeypatch, shared, marker):\n"
        "    monkeypatch.setenv('GS_FAKE', '1')\n    monkeypatch.setattr(os, 'sep', '!')\n"
        "    shared['calls'] += 1\n    assert tmp_path.is_dir() and os.sep == '!' and os.environ['GS_FAKE'] == '1'\n"
        "    with pytest.raises(ValueError, match='bad'):\n        raise ValueError('bad value')\n\n"
        "def test_undone(shared):\n"
        "    assert 'GS_FAKE' not in os.environ and os.sep == '/' and shared['calls'] == 1\n\n"
        "@pytest.mark.skipif(True, reason='not here')\ndef test_marked():\n    raise AssertionError\n\n"
        "def test_skips_itself():\n    pytest.skip('asked to')\n\n"
        "def test_fails():\n    assert 1 == 2\n\n"
        "def test_unknown_fixture(request):\n    pass\n")
    real = sys.modules.get("pytest")
    results = gs.run_test_files([tmp_path / "test_fake.py"], conftest=tmp_path / "conftest.py")
    assert sys.modules.get("pytest") is real and "GS_FAKE" not in os.environ
    status = {r["test"].split("::")[1]: (r["status"], r.get("reason", "")) for r in results}
    assert status["test_fixtures"][0] == "passed" and status["test_undone"][0] == "passed"
    assert status["test_marked"] == ("skipped", "not here") and status["test_skips_itself"] == ("skipped", "asked to")
    assert status["test_fails"][0] == "failed" and "AssertionError" in status["test_fails"][1]
    assert status["test_unknown_fixture"][0] == "error" and "request" in status["test_unknown_fixture"][1]
    assert (tmp_path / "teardown").read_text() == "done"  # the session fixture's teardown ran


def test_gpu_session_a_failing_or_unaffordable_phase_is_recorded_and_the_session_goes_on(tmp_path):
    gs = _gpu_session()
    assert gs.parse_phases("2-4") == [0, 2, 3, 4, 9] and gs.parse_phases("8") == [0, 8, 9]
    session = gs.Session(gs.parse_args(["--config", "tiny", "--device", "cpu", "--out", str(tmp_path)]))
    session.budget = gs.Budget(1.0)
    session.run_phase(2, lambda: None)
    session.budget = gs.Budget(None)
    session.run_phase(3, lambda: 1 / 0)
    session.run_phase(4, lambda: None)
    phases = json.loads((tmp_path / "gpu_session.json").read_text())["phases"]
    assert phases["2"]["status"] == "skipped" and phases["2"]["reason"].startswith("budget")
    assert phases["3"]["status"] == "failed" and "ZeroDivisionError" in phases["3"]["traceback"]
    assert phases["4"]["status"] == "ok"
    assert "phase 3 failed: ZeroDivisionError" in gs.table(session.results)
    # bench/kernel_count.py runs in the background and its last JSON line is collected.
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "kernel_count.py").write_text(
        "import json, os\nprint('noise')\n"
        "print(json.dumps({'bf16': 1100, 'interpret': os.environ['TRITON_INTERPRET']}))\n")
    gs.ROOT = tmp_path
    session.start_kernel_count()
    assert session.finish_kernel_count()["result"] == {"bf16": 1100, "interpret": "1"}
