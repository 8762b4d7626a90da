"""What a user sees when something goes wrong: one line on stderr, the right exit code, no traceback.

Each known reproduction from issue 10 (a damaged weights file, a huge seed, a non-UTF-8 trace,
a picture into a missing directory, a tiny vocabulary in ``bench``) and every flag check, which
must fire before any checkpoint is read.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from diffgen.cli.support import funnel
from diffgen.cli.app import app
from tests.conftest import run_cli

runner = CliRunner()
NOWHERE = "/nonexistent/diffgen-checkpoint"  # flags must be refused before this is even looked at


def invoke(*args, input=None, env=None):
    return runner.invoke(app, list(args), input=input, env=env)


def one_line(result_or_done, code, *words):
    """The result failed with ``code``, said one ``diffgen: error:`` line holding ``words``, and nothing else."""
    if hasattr(result_or_done, "exit_code"):
        exit_code, stdout, stderr = result_or_done.exit_code, result_or_done.stdout, result_or_done.stderr
    else:
        exit_code, stdout, stderr = (result_or_done.returncode, result_or_done.stdout.decode(),
                                     result_or_done.stderr.decode())
    assert exit_code == code, (stdout, stderr)
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffgen: error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- item 1: the known reproductions ------------------------------------------------------------


@pytest.fixture
def truncated(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    with open(copy / "model.safetensors", "r+b") as handle:  # truncate -s 100000 ckpt/model.safetensors
        handle.truncate(100_000)
    return copy


def test_truncated_weights_are_named_as_damaged_with_the_fix(truncated):
    done = run_cli("run", "-m", str(truncated), "Hi", input=b"")
    line = one_line(done, 1, "model.safetensors", "damaged", "truncated", "again")
    assert "diffgen pull" in line


def test_corrupt_weights_header_is_named_as_damaged(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[8:40] = b"\x00\xff" * 16  # garbage where the JSON header starts
    (copy / "model.safetensors").write_bytes(bytes(data))
    one_line(invoke("run", "-m", str(copy), "Hi"), 1, "damaged", "not valid JSON")


def test_a_damaged_hub_snapshot_says_to_delete_the_blob_and_pull_again(truncated, tmp_path):
    from tests.test_loader import hub_cache

    hub_cache(tmp_path / "hf" / "hub", "acme/tiny", truncated)
    done = run_cli("run", "-m", "acme/tiny", "Hi", input=b"", env={"HF_HOME": str(tmp_path / "hf")})
    one_line(done, 1, "damaged", "delete", "diffgen pull acme/tiny")


def test_a_seed_beyond_64_bits_is_refused_before_loading(tiny_checkpoint):
    result = invoke("run", "-m", str(tiny_checkpoint), "--seed", "99999999999999999999", "Hi")
    one_line(result, 2, "--seed", "2**63-1")


def test_replay_of_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_bytes(b'{"type": "header", "prompt": "caf\xe9"}\n')
    one_line(invoke("replay", str(path)), 2, str(path), "not UTF-8")


@pytest.fixture
def trace_file(tmp_path):
    from diffgen.records.trace import TraceWriter

    path = tmp_path / "run.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        writer = TraceWriter(handle)
        writer.header(model="m", prompt="Hi", settings={"max_denoising_steps": 2}, canvas_length=4, channel_ids=None)
        writer.result({"text": "ok", "thoughts": None, "finish_reason": "eos", "stats": {}})
    return path


def test_replay_svg_into_a_missing_directory(trace_file, tmp_path):
    target = tmp_path / "missing" / "run.svg"
    one_line(invoke("replay", str(trace_file), "--svg", str(target)), 2, "--svg", "does not exist", "mkdir")
    assert not target.parent.exists()


def test_bench_on_a_vocabulary_under_200_tokens(tmp_path_factory):
    from devtools.tiny import save_tiny_checkpoint

    small = save_tiny_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", seed=0, vocab_size=150)
    result = invoke("bench", "-m", str(small), "--steps", "2", "--canvases", "1", "--reps", "1",
                    "--prompt-tokens", "8", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2


def test_bench_prompt_ids_avoid_special_tokens_for_any_vocabulary():
    from devtools.tiny import build_tokenizer, tiny_config

    from diffgen.denoise.bench import ordinary_token_ids

    for vocab in (150, 512, 262_144):
        config = tiny_config(vocab_size=min(vocab, 512))
        ids = ordinary_token_ids(config, build_tokenizer(512), vocab)
        assert ids and all(0 <= i < vocab for i in ids)
        assert not {config.image_token_id, config.boi_token_id, config.eoi_token_id, 0, 1, 2} & set(ids)
    assert ordinary_token_ids(tiny_config(), None, 262_144) == list(range(200, 1000))


# -- item 1: the funnel itself --------------------------------------------------------------------


def test_an_unexpected_exception_names_what_was_being_done(tiny_checkpoint, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("diffgen.denoise.loop.generate", broken)
    line = one_line(invoke("run", "-m", str(tiny_checkpoint), "-q", "-n", "4", "Hi"), 1)
    assert line == ("diffgen: error: generating: RuntimeError: boom — this is a bug or an unexpected condition; "
                    "set DIFFGEN_DEBUG=1 for the traceback")


def test_an_unexpected_exception_outside_any_command_phase(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr("diffgen.cli.support.config.read_or_warn", broken)
    one_line(invoke("info", "--json"), 1, "reading the config file: KeyError", "DIFFGEN_DEBUG=1")


def test_debug_lets_the_unexpected_exception_through(tiny_checkpoint, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("diffgen.denoise.loop.generate", broken)
    result = invoke("run", "-m", str(tiny_checkpoint), "-n", "4", "Hi", env={"DIFFGEN_DEBUG": "1"})
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_a_closed_stdout_is_not_an_error(tiny_checkpoint, monkeypatch):
    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("diffgen.ui.render.write_answer", closed)
    result = invoke("run", "-m", str(tiny_checkpoint), "-n", "4", "--steps", "1", "-q", "Hi")
    assert result.exit_code == 0 and result.stderr == ""


def test_main_catches_what_escapes_the_app(monkeypatch, capsys):
    from diffgen.cli import app as app_module

    def broken(*args, **kwargs):
        raise OSError("no such terminal")

    monkeypatch.setattr(app_module, "app", broken)
    with pytest.raises(SystemExit) as info:
        app_module.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("diffgen: error: starting diffgen: OSError: no such terminal — this is a bug")
    assert err.count("\n") == 1


def test_the_real_cli_prints_one_line_for_a_usage_error():
    done = run_cli("run", "--steps", "many", "Hi", input=b"")
    one_line(done, 2, "--steps", "many", "diffgen run --help")


def test_retried_shows_the_command_with_the_flags_changed():
    argv = ["run", "-m", "ckpt", "--quant", "fp32", "--offload", "Why is the sky blue?"]
    assert funnel.retried(argv, [("--quant", "nf4")]) == \
        "diffgen run -m ckpt --quant nf4 --offload 'Why is the sky blue?'"
    assert funnel.retried(["run", "--quant=fp32", "Hi"], [("--quant", "bf16"), ("--offload", None)]) == \
        "diffgen run --offload --quant bf16 Hi"
    assert funnel.retried(["run", "Hi", "--", "--quant"], [("--quant", "nf4")]) == \
        "diffgen run --quant nf4 Hi -- --quant"
    assert funnel.retried(["--no-color", "run", "--offload", "Hi"], [("--offload", False)]) == \
        "diffgen --no-color run Hi"


# -- item 2: every flag is checked before anything is read ---------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--t-max", "inf"], ["--t-max", "finite"]),
    (["--t-max", "nan"], ["--t-max", "finite"]),
    (["--t-min", "-inf"], ["--t-min", "finite"]),
    (["--t-min", "0.9", "--t-max", "0.5"], ["t-max must be greater than t-min"]),
    (["--t-max", "0"], ["--t-max", "> 0"]),
    (["--steps", "0"], ["--steps", "positive"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens", "positive"]),
    (["--entropy-bound", "0"], ["--entropy-bound", "> 0"]),
    (["--entropy-bound", "inf"], ["--entropy-bound", "finite"]),
    (["--confidence", "-0.1"], ["--confidence", "> 0"]),
    (["--stability", "-1"], ["--stability", ">= 0"]),
    (["--seed", "-1"], ["--seed", "2**63-1"]),
    (["--seed", str(2**63)], ["--seed", "2**63-1"]),
    (["--seed", "abc"], ["--seed", "abc"]),
    (["--quant", "fp9"], ["--quant", "fp9", "nf4"]),
    (["--quant", "fp16", "--device", "cpu"], ["--quant fp16", "cpu"]),
    (["--device", "gpu"], ["--device", "gpu", "cuda:N"]),
    (["--max-memory", "lots"], ["memory size", "lots"]),
    (["--trace", "/nonexistent-dir/run.jsonl"], ["--trace", "does not exist"]),
    (["--raw", "--think"], ["--raw and --think exclude each other"]),
    (["--raw", "--system", "Be brief."], ["--raw and --system exclude each other"]),
    (["--exact", "--fast"], ["--exact and --fast exclude each other"]),
    (["--bogus"], ["no such option: --bogus"]),
], ids=lambda value: " ".join(value) if isinstance(value, list) and value and value[0].startswith("-") else None)
def test_bad_flags_are_usage_errors_before_the_checkpoint_is_looked_at(flags, words):
    line = one_line(invoke("run", "-m", NOWHERE, *flags, "Hi"), 2, *words)
    assert "no directory" not in line


def test_t_max_inf_no_longer_gives_an_empty_answer(tiny_checkpoint):
    one_line(invoke("run", "-m", str(tiny_checkpoint), "--t-max", "inf", "-n", "4", "--steps", "2", "Hi"), 2,
             "finite")


def test_a_conflict_with_the_checkpoint_default_is_found_before_the_weights_load(tiny_checkpoint):
    result = invoke("run", "-m", str(tiny_checkpoint), "--t-min", "0.9", "Hi")  # the checkpoint's t-max is 0.8
    one_line(result, 2, "t-max must be greater than t-min")
    assert "plan:" not in result.stderr


def test_bench_checks_its_flags_too():
    one_line(invoke("bench", "--random-config", "real", "--exact", "--fast"), 2, "exclude each other")
    one_line(invoke("bench", "--random-config", "real", "--reference-cache", "warm"), 2, "--reference-cache", "warm")


def test_completion_refuses_an_unknown_shell_listing_the_known_ones():
    one_line(invoke("completion", "tcsh"), 2, "tcsh", "bash", "zsh", "fish")


# -- item 7: --offload only where there is a GPU, and errors that give the command to run ----------


def test_on_the_cpu_nothing_fits_never_suggests_offload(tiny_checkpoint):
    line = one_line(invoke("run", "-m", str(tiny_checkpoint), "--max-memory", "1MB", "Hi"), 2, "needs")
    assert "--offload" not in line


def test_offload_on_the_cpu_says_it_only_moves_layers_off_a_gpu(tiny_checkpoint):
    one_line(invoke("run", "-m", str(tiny_checkpoint), "--offload", "--max-memory", "1MB", "Hi"), 2,
             "--offload only moves layers from a CUDA GPU")


def test_a_scheme_that_does_not_fit_names_the_command_that_does(tiny_checkpoint):
    from diffgen.loading.prepare import machine, plan_load  # noqa: F401 - the same plan the command makes
    from diffgen.loading.loader import resolve_config
    from diffgen.planning import plan, sizes
    _, config = resolve_config(str(tiny_checkpoint))
    table = {e.scheme: e for e in plan.estimates(config, sizes.count_parameters(config), device="cpu",
                                                 dtype="float32", budget=None, context=min(
                                                     sizes.DEFAULT_CONTEXT, config["text_config"][
                                                         "max_position_embeddings"]))}
    budget = (table["fp32"].total + table["bf16"].total) // 2  # bf16 fits, fp32 does not
    line = one_line(invoke("run", "-m", str(tiny_checkpoint), "--quant", "fp32", "--max-memory", str(budget), "Hi"),
                    2, "--quant fp32 needs")
    assert line.endswith(f"--quant bf16 fits ({sizes.human(table['bf16'].total)}): "
                         f"diffgen run -m {tiny_checkpoint} --quant bf16 --max-memory {budget} Hi")
