"""The package's layers point one way (the contract lives in pyproject.toml, run by import-linter)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_layer_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_test_fixtures_and_doc_generators_are_not_in_the_runtime_package():
    package = ROOT / "diffgen"
    assert not (package / "tiny.py").exists() and not (package / "docs.py").exists()
    assert not any("devtools" in path.read_text(encoding="utf-8") for path in package.rglob("*.py"))
