"""diffgen batch: input parsing, batching that does not change answers, and losing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from diffgen.records.batch import InputError, Job, derive_seed, parse
from diffgen.cli.app import app

runner = CliRunner()
QUICK = ["-n", "16", "--steps", "3"]
PROMPTS = ["Why is the sky blue?", "hi", "日本語のテキスト 🎉", "Summarise: diffusion denoises a canvas",
           "one two three", "x"]


def jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_records(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def batch(tiny_checkpoint, *args, input=None):
    return runner.invoke(app, ["batch", *args, "-m", str(tiny_checkpoint)], input=input)


def comparable(record):
    """A record without its timing, which naturally differs between runs."""
    return {k: v for k, v in record.items() if k != "stats"} | {
        "stats": {k: v for k, v in record.get("stats", {}).items() if k not in {"seconds", "tokens_per_second"}}
    }


# -- parsing ---------------------------------------------------------------------------------------


def test_text_input_ids_are_line_numbers_and_blank_lines_are_skipped():
    items = list(parse(["first prompt", "", "second prompt\r"]))
    assert [(i.id, i.prompt) for i in items] == [(1, "first prompt"), (3, "second prompt")]


def test_jsonl_records_with_settings():
    (job,) = parse(['{"id": "a", "prompt": "p", "steps": 4, "t_min": 0.2, "think": true, "seed": 9}'])
    assert isinstance(job, Job) and job.id == "a" and job.think and job.seed == 9
    assert dict(job.overrides) == {"max_denoising_steps": 4, "t_min": 0.2}


@pytest.mark.parametrize("line, words", [
    ("{nope", "not valid JSON"),
    ('["a"]', "JSON object"),
    ('{"prompt": "no id"}', "'id'"),
    ('{"id": "a", "prompt": "p", "temperature": 1}', "unknown field"),
    ('{"id": "a", "prompt": "p", "steps": "four"}', "'steps' must be int"),
    ('{"id": "a", "prompt": "  "}', "empty 'prompt'"),
    ('{"id": "a", "prompt": "p", "think": 1}', "'think' must be bool"),
])
def test_bad_records_become_input_errors_with_their_line(line, words):
    (item,) = list(parse(["", line], fmt="jsonl"))
    assert isinstance(item, InputError) and item.line == 2 and words in item.message


def test_duplicate_ids_are_errors_not_merged():
    items = list(parse(['{"id": 1, "prompt": "a"}', '{"id": 1, "prompt": "b"}']))
    assert isinstance(items[0], Job) and isinstance(items[1], InputError)
    assert "duplicate id 1 (first on line 1)" in items[1].message


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "a") == derive_seed(0, "a") != derive_seed(0, "b") != derive_seed(1, "a")


# -- through the CLI -------------------------------------------------------------------------------


def test_every_id_once_with_error_records_and_exit_1(tiny_checkpoint, tmp_path):
    source = tmp_path / "jobs.jsonl"
    source.write_text(jsonl([{"id": "a", "prompt": "Why?"}, {"id": "b", "prompt": "hi", "max_new_tokens": 5}])
                      + "not json\n" + jsonl([{"id": "a", "prompt": "again"}, {"id": "u", "prompt": "日本語 🎉"},
                                              {"id": "long", "prompt": "p", "max_new_tokens": 100000}]),
                      encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = batch(tiny_checkpoint, str(source), "-o", str(out), *QUICK)
    assert result.exit_code == 1
    records = read_records(out)
    by_line = {r["line"]: r for r in records}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6]
    assert {by_line[1]["id"], by_line[2]["id"], by_line[5]["id"]} == {"a", "b", "u"}
    assert "error" not in by_line[1] and len(by_line[2]["tokens"]) <= 5
    assert "not valid JSON" in by_line[3]["error"]
    assert "duplicate id" in by_line[4]["error"]
    assert "context" in by_line[6]["error"]
    assert "2 failed" not in result.stderr and "3 ok, 3 failed" in result.stderr


def test_all_good_exits_0_and_writes_the_documented_fields(tiny_checkpoint, tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    result = batch(tiny_checkpoint, str(source), *QUICK)  # stdout output
    assert result.exit_code == 0, result.stderr
    assert "batch size 32 (auto, from the memory plan)" in result.stderr  # the tiny model fits the cap
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == list(range(1, len(PROMPTS) + 1))
    for record in records:
        assert {"id", "text", "tokens", "finish_reason", "stats", "seed"} <= set(record)
        assert record["seed"] == derive_seed(0, record["id"])


def test_stdin_input_and_empty_input(tiny_checkpoint):
    result = batch(tiny_checkpoint, "-", *QUICK, input=jsonl([{"id": "s", "prompt": "from stdin"}]))
    assert result.exit_code == 0 and json.loads(result.stdout)["id"] == "s"
    empty = batch(tiny_checkpoint, "-", input="")
    assert empty.exit_code == 0 and empty.stdout == "" and "no prompts" in empty.stderr


def test_rerun_gives_identical_output(tiny_checkpoint, tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS), encoding="utf-8")
    first, second = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    for out in (first, second):
        assert batch(tiny_checkpoint, str(source), "-o", str(out), "--seed", "4", *QUICK).exit_code == 0
    assert [comparable(r) for r in read_records(first)] == [comparable(r) for r in read_records(second)]


def test_a_record_alone_equals_the_record_in_a_batch(tiny_checkpoint, tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS), encoding="utf-8")
    outputs = {}
    for size in ("1", "6"):
        out = tmp_path / f"b{size}.jsonl"
        assert batch(tiny_checkpoint, str(source), "-o", str(out), "--batch-size", size, *QUICK).exit_code == 0
        outputs[size] = {r["id"]: r["tokens"] for r in read_records(out)}
    assert outputs["1"] == outputs["6"]


def test_a_batch_record_equals_diffgen_run_with_its_seed(tiny_checkpoint):
    result = batch(tiny_checkpoint, "-", *QUICK, input=jsonl([{"id": "r", "prompt": "Why?", "seed": 42}]))
    single = runner.invoke(app, ["run", "-m", str(tiny_checkpoint), "--json", "--seed", "42", *QUICK, "Why?"])
    assert json.loads(result.stdout)["tokens"] == json.loads(single.stdout)["tokens"]


def test_existing_output_is_not_clobbered(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "line": 1, "text": "kept"}\n')
    result = batch(tiny_checkpoint, "-", "-o", str(out), input="prompt\n")
    assert result.exit_code == 2 and "--resume" in result.stderr
    assert out.read_text() == '{"id": 1, "line": 1, "text": "kept"}\n'


def test_resume_drops_a_torn_last_line_and_finishes(tiny_checkpoint, tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert batch(tiny_checkpoint, str(source), "-o", str(out), "--batch-size", "2", *QUICK).exit_code == 0
    complete = read_records(out)
    kept = out.read_text(encoding="utf-8").splitlines(keepends=True)[:3]
    out.write_text("".join(kept) + '{"id": 4, "line": 4, "text": "torn', encoding="utf-8")  # a kill -9 mid-write
    result = batch(tiny_checkpoint, str(source), "-o", str(out), "--resume", "--batch-size", "2", *QUICK)
    assert result.exit_code == 0 and "3 skipped" in result.stderr
    resumed = read_records(out)
    assert sorted(r["id"] for r in resumed) == list(range(1, len(PROMPTS) + 1))
    assert sorted(map(json.dumps, map(comparable, resumed))) == sorted(map(json.dumps, map(comparable, complete)))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_killed_run_then_resume_holds_every_id_exactly_once(tiny_checkpoint, tmp_path, sig):
    source = tmp_path / "jobs.jsonl"
    ids = [f"r{i}" for i in range(12)]
    source.write_text(jsonl([{"id": i, "prompt": f"prompt number {n}"} for n, i in enumerate(ids)]))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "diffgen", "batch", str(source), "-o", str(out), "-m", str(tiny_checkpoint),
               "-n", "16", "--steps", "200", "--batch-size", "2", "--confidence", "1e-9"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert process.returncode == 130 and b"--resume" in err and b"Traceback" not in err
    else:
        assert process.returncode == -signal.SIGKILL
    partial = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert 2 <= len(partial) < len(ids)
    done = subprocess.run(command + ["--resume"], capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()
    records = read_records(out)  # every line parses: no partial line survived
    assert sorted(r["id"] for r in records) == sorted(ids)


def test_progress_bar_shows_records_tokens_per_second_and_eta():
    import io

    from rich.console import Console

    from diffgen.records.batch import Summary
    from diffgen.cli.batch import _Progress

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    progress = _Progress(console)
    progress.update(Summary(total=4, ok=0), 0)
    progress.update(Summary(total=4, ok=2, tokens=40), 40)
    progress.stop()
    text = console.file.getvalue()
    assert "2/4" in text and "tok/s" in text and "records" in text
