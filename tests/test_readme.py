"""The README's first screen: two set-up commands that do not undo each other, CI runs the second, and the
architecture table names the package's layers."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _first_screen() -> str:
    return README[: README.index("\n## ")]


def _setup_commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", _first_screen(), re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_first_screen_has_exactly_two_setup_commands_that_keep_each_others_files():
    install, test = _setup_commands()
    assert install.startswith("pip install . && diffgen run")
    # An editable install after `pip install .` removes the installed man page and completions.
    assert test == "pip install '.[dev]' && python -m pytest" and " -e " not in test


def test_the_first_screen_offers_the_cpu_torch_before_pip_fetches_the_cuda_build():
    assert "--index-url https://download.pytorch.org/whl/cpu" in _first_screen()


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == _setup_commands()[1]


def test_the_architecture_table_names_every_subpackage_and_top_module():
    table = README[README.index("## Architecture"): README.index("## Benchmarks")]
    package = ROOT / "diffgen"
    for path in sorted(package.iterdir()):
        if path.is_dir() and (path / "__init__.py").exists():
            assert f"`diffgen/{path.name}/`" in table, path.name
            for module in path.glob("*.py"):
                assert module.name == "__init__.py" or f"`{module.name}`" in table or f"`{module.stem}`" in table, module
        elif path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py"):
            assert f"`diffgen/{path.name}`" in table, path.name
    assert "`devtools/`" in table
