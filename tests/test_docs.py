"""Generated completions and man page stay in sync, work, and the CLI polish around them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from devtools import docs
from diffgen.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
BIN = str(Path(sys.executable).parent)


def test_committed_completions_and_man_page_are_up_to_date():
    assert docs.main(["--check", "--root", str(ROOT)]) == 0, "run `python -m devtools.docs` and commit the result"


def test_completion_command_prints_the_committed_script():
    for shell, name in docs.SHELLS.items():
        result = runner.invoke(app, ["completion", shell])
        assert result.exit_code == 0 and result.stdout == (ROOT / "completions" / name).read_text()


def bash_complete(words: list[str], env: dict | None = None) -> list[str]:
    script = (f"source {ROOT / 'completions' / 'diffgen.bash'}\n"
              f"COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}\n"
              "_diffgen_completion diffgen\n"
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    full_env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), **(env or {})}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=full_env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completes_commands():
    assert bash_complete(["diffgen", "ru"]) == ["run"]
    assert set(bash_complete(["diffgen", ""])) >= {"run", "batch", "replay", "info", "pull", "completion"}


def test_bash_completes_options():
    assert "--show-steps" in bash_complete(["diffgen", "run", "--sho"])


def test_bash_completes_models_from_the_hugging_face_cache(tmp_path):
    for name in ("models--acme--tiny", "models--acme--other", "datasets--acme--data"):
        (tmp_path / "hub" / name).mkdir(parents=True)
    assert bash_complete(["diffgen", "run", "--model", "acme/t"], {"HF_HOME": str(tmp_path)}) == ["acme/tiny"]
    assert bash_complete(["diffgen", "run", "-m", "acme/"], {"HF_HOME": str(tmp_path)}) == ["acme/other", "acme/tiny"]


def test_bash_completes_models_from_hf_hub_cache(tmp_path):
    (tmp_path / "elsewhere" / "models--acme--cached").mkdir(parents=True)
    env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "elsewhere")}
    assert bash_complete(["diffgen", "run", "--model", "acme/"], env) == ["acme/cached"]


def test_bash_completes_devices():
    assert bash_complete(["diffgen", "run", "--device", "c"]) == ["cpu", "cuda"]


def test_model_completion_does_not_import_torch(tmp_path):
    (tmp_path / "hub" / "models--acme--tiny").mkdir(parents=True)
    code = ("import os, sys\n"
            "os.environ.update(_DIFFGEN_COMPLETE='complete_bash', COMP_WORDS='diffgen run --model acme/',"
            " COMP_CWORD='3')\n"
            "from diffgen.cli.app import app\n"
            "try:\n    app(prog_name='diffgen')\nexcept SystemExit:\n    pass\n"
            "print('\\nimported:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_HOME": str(tmp_path)})
    assert "acme/tiny" in done.stdout and "imported: []" in done.stdout, done.stdout + done.stderr


def test_completion_does_not_import_torch():
    code = ("import os, sys\n"
            "os.environ.update(_DIFFGEN_COMPLETE='complete_bash', COMP_WORDS='diffgen ru', COMP_CWORD='1')\n"
            "from diffgen.cli.app import app\n"
            "try:\n    app(prog_name='diffgen')\nexcept SystemExit:\n    pass\n"
            "print('\\nimported:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "run" in done.stdout and "imported: []" in done.stdout


def test_man_page_renders_without_warnings():
    groff = shutil.which("groff")
    if groff is None:
        if os.environ.get("CI"):
            raise RuntimeError("groff is missing: .ci/run installs it")
        pytest.skip("groff is not installed")
    done = subprocess.run([groff, "-man", "-ww", "-z", str(ROOT / "man" / "diffgen.1")], capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stderr == ""
    text = subprocess.run([groff, "-man", "-Tutf8", "-P-cbou", str(ROOT / "man" / "diffgen.1")], capture_output=True,
                          text=True).stdout
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "ENVIRONMENT", "FILES", "EXIT STATUS", "EXAMPLES"):
        assert section in text


def test_man_page_documents_every_command_and_option():
    import typer.main

    page = (ROOT / "man" / "diffgen.1").read_text()
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        assert f'.SS "diffgen {name} ' in page
        for param in command.params:
            for opt in param.opts if param.param_type_name == "option" else ():
                assert opt.replace("-", "\\-") in page
    for variable in ("DIFFGEN_MODEL", "DIFFGEN_DEBUG", "HF_HOME", "HF_HUB_OFFLINE", "NO_COLOR", "config.toml"):
        assert variable in page
    assert "cat notes.md | diffgen run" in page.replace("\\-", "-") and "--show-steps" in page.replace("\\-", "-")


def test_every_command_help_has_examples():
    import typer.main

    for name in typer.main.get_command(app).commands:
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "Examples" in result.stdout, name


@pytest.mark.parametrize("args", [["--no-color", "info", "--json"], ["info", "--json", "--no-color"],
                                  ["completion", "--no-color", "bash"]], ids=" ".join)
def test_no_color_flag_sets_no_color_before_or_after_the_command(monkeypatch, args):
    monkeypatch.delenv("NO_COLOR", raising=False)
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and os.environ.get("NO_COLOR") == "1"
    monkeypatch.delenv("NO_COLOR")


def test_every_command_takes_no_color():
    import typer.main

    for name, command in typer.main.get_command(app).commands.items():
        assert any("--no-color" in p.opts for p in command.params), name


# -- help tells the truth -------------------------------------------------------------------------


def _help(*command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    return " ".join(result.stdout.split())


@pytest.mark.parametrize("flag, default", [
    ("--max-new-tokens", "256"), ("--steps", "48"), ("--entropy-bound", "0.1"), ("--t-min", "0.4"),
    ("--t-max", "0.8"), ("--stability", "1"), ("--confidence", "0.005"),
])
def test_help_gives_the_sampler_defaults_and_where_they_come_from(flag, default):
    text = _help("run")
    after = text[text.index(flag + " "):]
    assert f"[default: (from the checkpoint; {default} for google/diffusiongemma-26B-A4B-it)]" in after[:400]
    assert "generation_config.json" in text


def test_help_gives_the_seed_and_sampler_defaults():
    text = _help("run")
    assert "[default: (random, reported by --json)]" in text
    assert "[default: (on for the CPU)]" in text and "[default: (on for GPUs)]" in text
    assert "[default: auto]" in text and "[default: google/diffusiongemma-26B-A4B-it]" in text
    assert "--no-stdin" in text and "< /dev/null" in text


def test_no_help_shows_a_flag_as_if_it_took_a_value():
    import typer.main

    for name in ["", *typer.main.get_command(app).commands]:
        text = _help(*([name] if name else []))
        assert "<bool>" not in text, name
    assert "<auto|fp32" not in _help("run") and "<scheme>" in _help("run")


def test_quant_choices_come_from_the_plan():
    import typing

    from diffgen.cli.support.options import QuantChoice
    from diffgen.planning.plan import QUANT_CHOICES

    assert typing.get_args(QuantChoice) == QUANT_CHOICES


def test_bare_diffgen_prints_the_help():
    result = runner.invoke(app, [])
    assert "Usage: diffgen" in result.output and "run" in result.output


# -- the config file: flags > environment > config file > built-in defaults ------------------------


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("DIFFGEN_CONFIG", raising=False)
    (tmp_path / "diffgen").mkdir()
    return tmp_path / "diffgen" / "config.toml"


def _used(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_config_file_sets_defaults_and_command_tables_win(config_home, tiny_checkpoint):
    config_home.write_text(f'model = "{tiny_checkpoint}"\nsteps = 3\n[run]\nmax-new-tokens = 5\n')
    record = _used(runner.invoke(app, ["run", "--json", "--seed", "1", "Hi"]))
    assert record["model"] == str(tiny_checkpoint)
    assert record["settings"]["max_denoising_steps"] == 3 and record["settings"]["max_new_tokens"] == 5


def test_environment_beats_the_config_file_and_flags_beat_both(config_home, tiny_checkpoint, tmp_path):
    config_home.write_text(f'model = "{tmp_path / "nowhere"}"\nsteps = 3\n')
    env = {"DIFFGEN_MODEL": str(tiny_checkpoint)}
    record = _used(runner.invoke(app, ["run", "--json", "--seed", "1", "-n", "4", "Hi"], env=env))
    assert record["model"] == str(tiny_checkpoint)  # environment > config
    record = _used(runner.invoke(app, ["run", "--json", "--seed", "1", "-n", "4", "--steps", "2", "Hi"], env=env))
    assert record["settings"]["max_denoising_steps"] == 2  # flag > config


def test_unknown_config_keys_warn(config_home, tiny_checkpoint):
    config_home.write_text(f'model = "{tiny_checkpoint}"\ncolour = "blue"\n')
    result = runner.invoke(app, ["run", "--json", "--seed", "1", "-n", "4", "--steps", "1", "Hi"])
    assert result.exit_code == 0 and "'colour' is not an option" in result.stderr


@pytest.mark.parametrize("args", [["run", "--help"], ["info", "--json"], ["completion", "bash"]], ids=" ".join)
def test_bad_toml_warns_once_naming_the_file_and_never_locks_the_user_out(config_home, args):
    config_home.write_text("model = \n")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(config_home) in warnings[0] and "ignoring it" in warnings[0]


def test_bad_toml_is_ignored_and_the_command_runs(config_home, tiny_checkpoint):
    config_home.write_text("steps = [\n")
    record = _used(runner.invoke(app, ["run", "-m", str(tiny_checkpoint), "--json", "--seed", "1", "-n", "4",
                                       "--steps", "1", "Hi"]))
    assert record["settings"]["max_denoising_steps"] == 1
    data = _used(runner.invoke(app, ["info", "--json"]))
    assert data["config"]["error"].startswith(f"cannot read the config file {config_home}")


@pytest.mark.parametrize("text, key, words", [
    ('[run]\nsteps = "many"\n', "[run] steps = 'many'", ["valid integer"]),
    ("t-max = inf\n", "t-max = inf", ["finite"]),
    ('quant = "fp9"\n', "quant = 'fp9'", ["nf4"]),
])
def test_a_bad_value_in_the_config_file_names_the_file_and_the_key(config_home, tiny_checkpoint, text, key, words):
    config_home.write_text(text)
    result = runner.invoke(app, ["run", "-m", str(tiny_checkpoint), "Hi"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.startswith(f"diffgen: error: config file {config_home}: {key}: ") and "\n" not in line
    assert all(word in line for word in words) and "invalid value" not in line


def test_a_flag_overrides_a_bad_value_in_the_config_file(config_home, tiny_checkpoint):
    config_home.write_text('[run]\nsteps = "many"\n')
    record = _used(runner.invoke(app, ["run", "-m", str(tiny_checkpoint), "--json", "--seed", "1", "-n", "4",
                                       "--steps", "2", "Hi"]))
    assert record["settings"]["max_denoising_steps"] == 2


def test_a_flag_overrides_a_conflicting_default_from_the_config_file(config_home, tiny_checkpoint):
    config_home.write_text("think = true\n")
    record = _used(runner.invoke(app, ["run", "-m", str(tiny_checkpoint), "--raw", "--json", "--seed", "1", "-n", "4",
                                       "--steps", "1", "Hi"]))
    assert record["text"] is not None
    result = runner.invoke(app, ["run", "-m", str(tiny_checkpoint), "--raw", "--think", "Hi"])
    assert result.exit_code == 2 and "--raw and --think exclude each other" in result.stderr


def test_info_shows_the_config_and_the_precedence(config_home):
    config_home.write_text('quant = "nf4"\nthink = true\n')
    data = _used(runner.invoke(app, ["info", "--json"]))
    assert data["config"]["exists"] and data["config"]["values"] == {"quant": "nf4", "think": True}
    assert data["config"]["precedence"].startswith("flags > environment")
    text = runner.invoke(app, ["info"], env={"COLUMNS": "160"}).stdout
    assert str(config_home) in text and "quant = 'nf4'" in text


def test_quiet_run_prints_only_the_answer(tiny_checkpoint):
    result = runner.invoke(app, ["run", "-m", str(tiny_checkpoint), "--quiet", "--seed", "1", "-n", "4", "--steps",
                                 "1"], input=b"caf\xe9")
    assert result.exit_code == 0 and result.stderr == ""
