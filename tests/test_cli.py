"""The ``diffgen`` command line, in process (CliRunner) and as a real subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from diffgen.cli.app import app
from diffgen.denoise.channels import Response
from tests.conftest import run_cli
from tests.test_loader import copy_checkpoint, hub_cache

runner = CliRunner()


def invoke(*args, input=None, env=None):
    return runner.invoke(app, list(args), input=input, env=env)


def _prompt_tokens(loaded, text):
    from diffgen.prompt import encode

    return len(encode(loaded.tokenizer, text))


@pytest.mark.parametrize(
    "args, stdin, expected_prompt",
    [
        (["Why is the sky blue?"], None, "Why is the sky blue?"),
        ([], "notes on light\n", "notes on light"),
        (["-"], "notes on light\n", "notes on light"),
        (["Summarise this"], "notes on light\n\n", "notes on light\n\nSummarise this"),
    ],
    ids=["argument", "stdin", "dash", "stdin+argument"],
)
def test_prompt_sources_compose_as_documented(tiny, tiny_checkpoint, args, stdin, expected_prompt):
    result = invoke("run", "-m", str(tiny_checkpoint), "--json", "--seed", "4", "-n", "8", "--steps", "3", *args,
                    input=stdin)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["stats"]["prompt_tokens"] == _prompt_tokens(tiny, expected_prompt)


def test_stdout_is_the_answer_alone_and_matches_the_library(tiny, tiny_checkpoint):
    from diffgen.denoise.loop import generate
    from diffgen.prompt import encode

    result = invoke("run", "-m", str(tiny_checkpoint), "--seed", "7", "-n", "12", "--steps", "4", "Hello there")
    assert result.exit_code == 0, result.stderr
    settings = tiny.defaults.replace(seed=7, max_new_tokens=12, max_denoising_steps=4)
    expected = generate(tiny, [encode(tiny.tokenizer, "Hello there")], settings).completions[0]
    assert result.stdout == expected.text + "\n"


def test_json_has_the_documented_fields(tiny_checkpoint):
    result = invoke("run", "-m", str(tiny_checkpoint), "--json", "--seed", "3", "-n", "20", "--steps", "2", "Hi")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert {"text", "tokens", "finish_reason", "model", "seed", "stats"} <= set(record)
    assert record["seed"] == 3 and record["model"] == str(tiny_checkpoint)
    assert record["finish_reason"] in {"eos", "length"} and len(record["tokens"]) <= 20
    assert record["stats"]["steps_per_canvas"] == [2, 2][: record["stats"]["canvases"]]
    assert record["settings"]["max_denoising_steps"] == 2


def test_without_seed_a_random_seed_is_reported_and_reproduces(tiny_checkpoint):
    first = json.loads(invoke("run", "-m", str(tiny_checkpoint), "--json", "-n", "8", "--steps", "2", "Hi").stdout)
    again = invoke("run", "-m", str(tiny_checkpoint), "--json", "-n", "8", "--steps", "2", "--seed",
                   str(first["seed"]), "Hi")
    assert json.loads(again.stdout)["tokens"] == first["tokens"]


def test_generation_flags_reach_the_sampler(tiny_checkpoint):
    result = invoke("run", "-m", str(tiny_checkpoint), "--json", "--seed", "1", "-n", "4", "--steps", "5",
                    "--entropy-bound", "0.7", "--t-min", "0.2", "--t-max", "0.9", "--stability", "3",
                    "--confidence", "0.01", "Hi")
    settings = json.loads(result.stdout)["settings"]
    assert settings == {**settings, "max_new_tokens": 4, "max_denoising_steps": 5, "entropy_bound": 0.7,
                        "t_min": 0.2, "t_max": 0.9, "stability_threshold": 3, "confidence_threshold": 0.01}


def test_stats_line_goes_to_stderr(tiny_checkpoint):
    result = invoke("run", "-m", str(tiny_checkpoint), "--stats", "--seed", "1", "-n", "4", "--steps", "2", "Hi")
    assert result.exit_code == 0
    assert "tokens in" in result.stderr and "steps 2" in result.stderr
    assert "tokens in" not in result.stdout


def test_model_from_environment(tiny_checkpoint):
    result = invoke("run", "--json", "--seed", "1", "-n", "4", "--steps", "1", "Hi",
                    env={"DIFFGEN_MODEL": str(tiny_checkpoint)})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == str(tiny_checkpoint)


@pytest.fixture
def fake_thoughts(monkeypatch):
    monkeypatch.setattr("diffgen.denoise.loop.split_response", lambda tok, ids: Response("the answer", "secret musing"))


def test_think_shows_thoughts_dimmed_on_stderr_never_stdout(tiny_checkpoint, fake_thoughts):
    result = invoke("run", "-m", str(tiny_checkpoint), "--think", "--seed", "1", "-n", "4", "--steps", "1", "Q")
    assert result.exit_code == 0
    assert result.stdout == "the answer\n"
    assert "secret musing" in result.stderr


def test_without_think_thoughts_are_not_shown(tiny_checkpoint, fake_thoughts):
    result = invoke("run", "-m", str(tiny_checkpoint), "--seed", "1", "-n", "4", "--steps", "1", "Q")
    assert result.stdout == "the answer\n"
    assert "secret musing" not in result.stderr


def _one_error_line(result, code, *words):
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffgen: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_empty_prompt_is_a_usage_error(tiny_checkpoint):
    _one_error_line(invoke("run", "-m", str(tiny_checkpoint), input=""), 2, "no prompt")


def test_missing_model(tmp_path):
    _one_error_line(invoke("run", "-m", str(tmp_path / "nope"), "Hi"), 1, "no directory")


def test_not_in_cache_while_offline(tmp_path):
    _one_error_line(invoke("run", "-m", "acme/absent", "--offline", "Hi", env={"HF_HOME": str(tmp_path)}), 1,
                    "offline")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    _one_error_line(invoke("run", "-m", str(tmp_path), "Hi"), 1, "config.json")


def test_pickled_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    pickled = copy_checkpoint(tiny_checkpoint, tmp_path / "p", drop=["model.safetensors"],
                              add={"pytorch_model.bin": b"x"})
    _one_error_line(invoke("run", "-m", str(pickled), "Hi"), 1, "pickled")


def test_missing_tokenizer(tiny_checkpoint, tmp_path):
    bare = copy_checkpoint(tiny_checkpoint, tmp_path / "t", drop=["tokenizer.json", "tokenizer_config.json"])
    _one_error_line(invoke("run", "-m", str(bare), "Hi"), 1, "tokenizer")


def test_prompt_longer_than_the_context(tiny_checkpoint):
    _one_error_line(invoke("run", "-m", str(tiny_checkpoint), "-n", "5000", "Hi"), 1, "context")


def test_invalid_setting_combination_is_a_usage_error(tiny_checkpoint):
    _one_error_line(invoke("run", "-m", str(tiny_checkpoint), "--t-min", "0.9", "Hi"), 2, "t-max")


def test_debug_shows_the_real_exception(tmp_path):
    result = invoke("run", "-m", str(tmp_path / "nope"), "Hi", env={"DIFFGEN_DEBUG": "1"})
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "ModelNotFoundError"


def test_invalid_utf8_on_stdin_is_replaced_with_a_warning(tiny_checkpoint):
    result = invoke("run", "-m", str(tiny_checkpoint), "--seed", "1", "-n", "4", "--steps", "1", input=b"caf\xe9")
    assert result.exit_code == 0
    assert "not valid UTF-8" in result.stderr


def test_ctrl_c_exits_130_without_traceback(tiny_checkpoint, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("diffgen.denoise.loop.generate", interrupted)
    result = invoke("run", "-m", str(tiny_checkpoint), "Hi")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr


def test_help_has_examples_and_explains_whole_canvases():
    result = invoke("run", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Examples" in result.stdout and "cat notes.md | diffgen run" in result.stdout
    assert "whole canvases" in result.stdout.replace("\n", " ")


def test_version_names_diffgen_torch_and_transformers():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("diffgen ") and "torch " in result.stdout and "transformers " in result.stdout


# -- real subprocesses ---------------------------------------------------------------------


def test_shell_pipe_into_the_real_cli(tiny_checkpoint):
    done = run_cli(shell=f"printf 'notes on light\\n' | {sys.executable} -m diffgen run -m '{tiny_checkpoint}' "
                         "--json --seed 2 -n 8 --steps 2 'Summarise this'")
    assert done.returncode == 0, done.stderr.decode()
    record = json.loads(done.stdout)
    assert record["seed"] == 2 and record["stats"]["new_tokens"] == len(record["tokens"])
    assert b"Traceback" not in done.stderr
    assert b"Loading weights" not in done.stderr  # no progress bars when stderr is not a terminal


def test_hub_id_from_the_cache_with_hf_hub_offline(tiny_checkpoint, tmp_path):
    hub_cache(tmp_path / "hub", "acme/tiny-diffusion", tiny_checkpoint)
    done = run_cli("run", "-m", "acme/tiny-diffusion", "--json", "--seed", "1", "-n", "4", "--steps", "1", "Hi",
                   env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["model"] == "acme/tiny-diffusion"


def test_sigint_during_generation_exits_130(tiny_checkpoint, tmp_path):
    trace = tmp_path / "run.jsonl"
    process = subprocess.Popen(
        # 192 canvases of the most steps allowed (1024): still denoising when the signal comes.
        [sys.executable, "-m", "diffgen", "run", "-m", str(tiny_checkpoint), "-n", "3072", "--steps", "1024",
         "--confidence", "1e-9", "--trace", str(trace), "Hi"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    # Wait for the first denoising step in the trace, which is written beside run.jsonl until it is
    # complete (no deadline: pytest-timeout is the safety net).
    while not any(b'"type": "step"' in path.read_bytes() for path in tmp_path.glob(".run.jsonl.*.tmp")):
        assert process.poll() is None, process.communicate()[1].decode()
        time.sleep(0.02)  # how often to look, not how long to wait
    process.send_signal(signal.SIGINT)
    out, err = process.communicate()
    assert process.returncode == 130, err.decode()
    assert b"Traceback" not in err and out == b""
    assert list(tmp_path.iterdir()) == []  # an interrupted trace is not renamed into place


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from diffgen.cli.app import app\n"
        "for command in (['--help'], ['run', '--help'], ['serve', '--help']):\n"
        "    result = CliRunner().invoke(app, command)\n"
        "    assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'starlette', 'uvicorn') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- stdin in shell loops, config.json once ----------------------------------------------------------


def test_no_stdin_ignores_what_is_piped(tiny, tiny_checkpoint):
    result = invoke("run", "-m", str(tiny_checkpoint), "--no-stdin", "--json", "--seed", "1", "-n", "4", "--steps",
                    "1", "Hi", input="the rest of prompts.txt\n")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["prompt_tokens"] == _prompt_tokens(tiny, "Hi")


def test_a_shell_loop_over_a_file_runs_every_prompt_with_no_stdin(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\nsecond\n")
    loop = (f"while read -r p; do {sys.executable} -m diffgen run -m '{tiny_checkpoint}' {{flag}} --json -q "
            f"--seed 1 -n 4 --steps 1 \"$p\"; done < '{prompts}'")
    done = run_cli(shell=loop.format(flag="--no-stdin"))
    assert done.returncode == 0, done.stderr.decode()
    assert len(done.stdout.decode().splitlines()) == 2
    swallowed = run_cli(shell=loop.format(flag=""))  # what the help warns about
    assert len(swallowed.stdout.decode().splitlines()) == 1


def test_run_reads_config_json_once(tiny_checkpoint, monkeypatch):
    from diffgen.loading import hub, loader

    reads = []
    real = hub.read_config

    def counting(path, label):
        reads.append(path)
        return real(path, label)

    monkeypatch.setattr(hub, "read_config", counting)
    monkeypatch.setattr(loader, "read_config", counting)
    result = invoke("run", "-m", str(tiny_checkpoint), "-q", "--seed", "1", "-n", "4", "--steps", "1", "Hi")
    assert result.exit_code == 0, result.stderr
    assert len(reads) == 1


def test_bench_reads_the_model_from_the_environment_and_shows_its_phases(tiny_checkpoint):
    result = invoke("bench", "--steps", "2", "--canvases", "1", "--reps", "2", "--prompt-tokens", "4", "--json",
                    env={"DIFFGEN_MODEL": str(tiny_checkpoint)})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == str(tiny_checkpoint)
    phases = [line for line in result.stderr.splitlines() if line.startswith("diffgen: bench: ")]
    assert [p.split(": ", 2)[2].rsplit(" (", 1)[0] for p in phases] == [
        f"loading {tiny_checkpoint}", "warm-up (first call)", "timed run 1/2", "timed run 2/2"]


def test_bench_random_config_wins_over_diffgen_model(tiny_checkpoint, tmp_path):
    from devtools.tiny import tiny_config

    config = tmp_path / "config.json"
    config.write_text(tiny_config().to_json_string())
    result = invoke("bench", "--random-config", str(config), "--steps", "2", "--canvases", "1", "--reps", "1",
                    "--prompt-tokens", "4", "--json", env={"DIFFGEN_MODEL": str(tiny_checkpoint)})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "random-config"


def test_compile_runs_the_fast_step_and_refuses_the_exact_sampler(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("DIFFGEN_COMPILE_BACKEND", "eager")  # dynamo traces the step; inductor is benchmarked apart
    args = ("run", "-m", str(tiny_checkpoint), "--seed", "3", "-n", "8", "--steps", "3", "--json", "Hi")
    compiled = invoke(*args[:1], "--compile", *args[1:])
    fast = invoke(*args[:1], "--fast", *args[1:])
    assert compiled.exit_code == 0 == fast.exit_code, compiled.stderr
    assert json.loads(compiled.stdout)["tokens"] == json.loads(fast.stdout)["tokens"]
    both = invoke("run", "-m", str(tiny_checkpoint), "--compile", "--exact", "Hi")
    assert both.exit_code == 2 and "--compile needs the fast sampler" in both.stderr
    assert "Traceback" not in both.stderr
