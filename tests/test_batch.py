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

from diffgen.errors import UsageError
from diffgen.records.batch import InputError, Job, derive_seed, detect_format, input_lines, parse
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


def test_stdin_input(tiny_checkpoint):
    result = batch(tiny_checkpoint, "-", *QUICK, input=jsonl([{"id": "s", "prompt": "from stdin"}]))
    assert result.exit_code == 0 and json.loads(result.stdout)["id"] == "s"


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


def wait_for_lines(path, count, process):
    """Block until ``path`` holds ``count`` complete lines (no deadline: pytest-timeout is the net)."""
    while not (path.exists() and path.read_bytes().count(b"\n") >= count):
        assert process.poll() is None, process.communicate()[1].decode()
        time.sleep(0.02)  # how often to look, not how long to wait


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_killed_run_then_resume_holds_every_id_exactly_once(tiny_checkpoint, tmp_path, sig):
    """The first two records are quick; the others would take hours, so the signal always lands
    in the middle of the job, however fast or loaded the machine. The resume runs them quick."""
    source = tmp_path / "jobs.jsonl"
    ids = [f"r{i}" for i in range(8)]
    records = [{"id": i, "prompt": f"prompt number {n}"} for n, i in enumerate(ids)]
    # Slow: the most steps a record may ask for (1024) on 192 canvases, some 200,000 decoder passes.
    slow = [{**r, "steps": 1024, "max_new_tokens": 3072} if n >= 2 else {**r, "steps": 2}
            for n, r in enumerate(records)]
    source.write_text(jsonl(slow))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "diffgen", "batch", str(source), "-o", str(out), "-m", str(tiny_checkpoint),
               "-n", "16", "--batch-size", "2", "--confidence", "1e-9"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_lines(out, 2, process)
    process.send_signal(sig)
    _, err = process.communicate()
    if sig == signal.SIGINT:
        assert process.returncode == 130 and b"--resume" in err and b"Traceback" not in err
    else:
        assert process.returncode == -signal.SIGKILL
    partial = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert [r["id"] for r in partial] == ids[:2]
    source.write_text(jsonl({**r, "steps": 2} for r in records))  # the rest, quick this time
    done = runner.invoke(app, [*command[3:], "--resume"])  # in this process: the kill was the real one
    assert done.exit_code == 0, done.stderr
    assert "6 ok, 0 failed, 2 skipped" in done.stderr
    records = read_records(out)  # every line parses: no partial line survived
    assert sorted(r["id"] for r in records) == sorted(ids)


def test_progress_bar_shows_records_tokens_per_second_and_eta():
    import io

    from rich.console import Console

    from diffgen.cli.support.batch_runner import Summary
    from diffgen.cli.support.batch_runner import Progress

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    progress = Progress(console)
    progress.update(Summary(total=4, ok=0), 0)
    progress.update(Summary(total=4, ok=2, tokens=40), 40)
    progress.stop()
    text = console.file.getvalue()
    assert "2/4" in text and "tok/s" in text and "records" in text


# -- input: BOM, format detection, ids, empty input --------------------------------------------------


def test_a_utf8_bom_is_dropped():
    lines = input_lines("\ufeff" + jsonl([{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q"}]))
    assert [item.id for item in parse(lines, name="-")] == ["a", "b"]
    assert input_lines("\ufeffWhy?\nHow?")[0] == "Why?"


def test_lines_split_at_newlines_only():
    record = {"id": "u", "prompt": "one\u2028two\x0cthree"}  # JSON may hold U+2028 and form feeds raw
    lines = input_lines(json.dumps(record, ensure_ascii=False) + "\r\n" + "plain\x0ctext\n")
    assert lines == [json.dumps(record, ensure_ascii=False), "plain\x0ctext"]
    (job,) = parse(lines[:1], name="-")
    assert job.prompt == record["prompt"]


def test_a_text_file_whose_first_prompt_starts_with_a_brace_is_text():
    lines = ["{name} is a placeholder: explain it", "second prompt", "{a, b} is a set"]
    assert detect_format(lines, "prompts.txt") == "text"
    assert [(i.id, i.prompt) for i in parse(lines, name="prompts.txt")] == [(1, lines[0]), (2, lines[1]), (3, lines[2])]


def test_json_lines_are_never_read_as_text_without_a_word():
    # The first line is broken, the rest are records: neither format is safe to guess.
    lines = ['{"id": 1, "prompt": "a"', '{"id": 2, "prompt": "b"}', '{"id": 3, "prompt": "c"}']
    with pytest.raises(UsageError) as info:
        detect_format(lines, "-")
    assert "line 1 is not" in str(info.value) and "--format jsonl" in str(info.value)
    # Told, the broken line becomes an error record and the others run.
    items = list(parse(lines, "jsonl", "-"))
    assert isinstance(items[0], InputError) and [i.id for i in items[1:]] == [2, 3]
    # A text file holding one prompt that happens to be a JSON object is refused as a whole, not line by line.
    with pytest.raises(UsageError):
        detect_format(["Why is the sky blue?", '{"id": 1, "prompt": "x"}', "hello"], "-")


@pytest.mark.parametrize("lines, name, expected", [
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"}'], "-", "jsonl"),
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"}', "oops"], "-", "jsonl"),  # first and most
    (["plain", "text"], "-", "text"),
    (["not a record"], "jobs.jsonl", "jsonl"),  # the name says so
])
def test_format_rule(lines, name, expected):
    assert detect_format(lines, name) == expected


def test_ids_3_and_string_3_are_two_records_with_two_seeds():
    items = list(parse(['{"id": 3, "prompt": "a"}', '{"id": "3", "prompt": "b"}']))
    assert all(isinstance(i, Job) for i in items) and [i.id for i in items] == [3, "3"]
    assert derive_seed(0, 3) != derive_seed(0, "3")


def test_ids_3_and_string_3_through_resume(tiny_checkpoint, tmp_path):
    source = tmp_path / "jobs.jsonl"
    source.write_text(jsonl([{"id": 3, "prompt": "a"}]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert batch(tiny_checkpoint, str(source), "-o", str(out), *QUICK).exit_code == 0
    source.write_text(jsonl([{"id": 3, "prompt": "a"}, {"id": "3", "prompt": "b"}]), encoding="utf-8")
    result = batch(tiny_checkpoint, str(source), "-o", str(out), "--resume", *QUICK)
    assert result.exit_code == 0 and "1 ok, 0 failed, 1 skipped" in result.stderr
    records = read_records(out)
    assert [r["id"] for r in records] == [3, "3"] and records[0]["seed"] != records[1]["seed"]


@pytest.mark.parametrize("text", ["", "\n\n  \n", "\ufeff"])
def test_an_empty_input_is_one_line_and_exit_2_before_the_model(tmp_path, text):
    source = tmp_path / "prompts.txt"
    source.write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["batch", str(source), "-m", str(tmp_path / "no-model-here")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("diffgen: error: no prompts in") and "empty" in result.stderr


# -- usage errors, all before any weights are read --------------------------------------------------


def usage_error(args, tmp_path, input=None):
    """Run batch with a model that does not exist: a usage error must win over the missing model."""
    result = runner.invoke(app, ["batch", *args, "-m", str(tmp_path / "no-model-here")], input=input)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("diffgen: error: "), result.stderr
    assert "no-model-here" not in result.stderr
    return result.stderr


def test_input_and_output_the_same_file_is_refused(tmp_path):
    source = tmp_path / "jobs.jsonl"
    source.write_text(jsonl([{"id": 1, "prompt": "keep me"}]), encoding="utf-8")
    before = source.read_bytes()
    for spelling in (str(source), str(tmp_path / "." / "jobs.jsonl")):
        for flag in ("--overwrite", "--resume"):
            assert "input file itself" in usage_error([str(source), "-o", spelling, flag], tmp_path)
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    assert "input file itself" in usage_error([str(source), "-o", str(link), "--overwrite"], tmp_path)
    assert source.read_bytes() == before


def test_resume_and_overwrite_together_is_a_usage_error(tmp_path):
    assert "--resume and --overwrite" in usage_error(["-", "-o", str(tmp_path / "o.jsonl"), "--resume",
                                                       "--overwrite"], tmp_path, input="hi\n")


def test_output_in_a_missing_directory_is_a_usage_error(tmp_path):
    assert "does not exist" in usage_error(["-", "-o", str(tmp_path / "nope" / "o.jsonl")], tmp_path, input="hi\n")


@pytest.mark.parametrize("args, words", [
    (["--format", "yaml"], "--format 'yaml'"),
    (["--batch-size", "0"], "--batch-size '0'"),
])
def test_bad_batch_flags_are_usage_errors(tmp_path, args, words):
    assert words in usage_error(["-", *args], tmp_path, input="hi\n")


def test_resume_on_a_read_only_output_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "line": 1, "text": "kept"}\n')
    real_open = os.open

    def read_only(path, flags, *args):  # what a read-only file or file system answers (root ignores chmod)
        if os.fspath(path) == str(out) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(out))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    stderr = usage_error(["-", "-o", str(out), "--resume"], tmp_path, input="hi\n")
    assert f"cannot write {out}: Permission denied" in stderr
    assert out.read_text() == '{"id": 1, "line": 1, "text": "kept"}\n'


# -- resume: failures are retried, settings must match -----------------------------------------------


def test_resume_retries_records_that_failed_and_keeps_one_record_per_id(tiny_checkpoint, tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert batch(tiny_checkpoint, str(source), "-o", str(out), *QUICK).exit_code == 0
    good = read_records(out)
    # As if records 2 and 5 had failed the first time (say, out of memory) and the job had stopped after 5.
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)[:5]
    lines[1] = json.dumps({"id": 2, "line": 2, "error": "RuntimeError: out of memory"}) + "\n"
    lines[4] = json.dumps({"id": 5, "line": 5, "error": "RuntimeError: out of memory"}) + "\n"
    out.write_text("".join(lines), encoding="utf-8")
    result = batch(tiny_checkpoint, str(source), "-o", str(out), "--resume", *QUICK)
    assert result.exit_code == 0, result.stderr
    assert "retrying 2 record(s) that failed before" in result.stderr
    assert "3 ok, 0 failed, 3 skipped" in result.stderr
    records = read_records(out)
    assert sorted(r["id"] for r in records) == list(range(1, len(PROMPTS) + 1))  # each id once, no error left
    assert sorted(map(json.dumps, map(comparable, records))) == sorted(map(json.dumps, map(comparable, good)))


def test_resume_exits_1_when_a_record_fails_again(tiny_checkpoint, tmp_path):
    source = tmp_path / "jobs.jsonl"
    source.write_text(jsonl([{"id": "ok", "prompt": "hi"}, {"id": "long", "prompt": "p", "max_new_tokens": 100000}]))
    out = tmp_path / "out.jsonl"
    assert batch(tiny_checkpoint, str(source), "-o", str(out), *QUICK).exit_code == 1
    again = batch(tiny_checkpoint, str(source), "-o", str(out), "--resume", *QUICK)
    assert again.exit_code == 1 and "retrying 1 record(s)" in again.stderr and "1 failed" in again.stderr
    records = read_records(out)
    assert [r["id"] for r in records] == ["ok", "long"] and "context" in records[1]["error"]


def test_resume_refuses_other_settings_unless_a_flag_says_so(tiny_checkpoint, tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert batch(tiny_checkpoint, str(source), "-o", str(out), "-n", "16", "--steps", "3", "--seed", "4").exit_code == 0
    kept = json.loads((tmp_path / "out.jsonl.settings.json").read_text())
    assert kept["settings"]["max_denoising_steps"] == 3 and kept["settings"]["seed"] == 4
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:2]), encoding="utf-8")
    before = out.read_bytes()
    # Omitting --steps would silently switch the rest of the job to the checkpoint's 48 steps.
    refused = batch(tiny_checkpoint, str(source), "-o", str(out), "--resume", "-n", "16", "--seed", "4")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "--steps 3 (this run: --steps 48)" in refused.stderr and out.read_bytes() == before
    # The same flags continue it.
    same = batch(tiny_checkpoint, str(source), "-o", str(out), "--resume", "-n", "16", "--steps", "3", "--seed", "4")
    assert same.exit_code == 0 and "4 ok" in same.stderr
    # An explicit flag changes a setting on purpose; the change is recorded beside the output.
    out.write_text("".join(lines[:2]), encoding="utf-8")
    changed = batch(tiny_checkpoint, str(source), "-o", str(out), "--resume", "-n", "16", "--steps", "2",
                    "--seed", "4")
    assert changed.exit_code == 0 and "--steps 2 (was --steps 3)" in changed.stderr
    kept = json.loads((tmp_path / "out.jsonl.settings.json").read_text())
    assert kept["settings"]["max_denoising_steps"] == 2
    assert kept["changes"] == [{"after_records": 2, "changed": {"max_denoising_steps": {"from": 3, "to": 2}}}]


# -- progress when stderr is not a terminal ----------------------------------------------------------


def test_progress_lines_when_stderr_is_not_a_terminal():
    import io

    from diffgen.cli.support.batch_runner import LineProgress
    from diffgen.cli.support.batch_runner import Summary

    now = [0.0]
    stream = io.StringIO()
    progress = LineProgress(stream, interval=10, clock=lambda: now[0])
    progress.update(Summary(total=4), 0)  # the first line comes at once
    now[0] = 4.0
    progress.update(Summary(total=4, ok=1, tokens=20), 20)  # within the interval: quiet
    now[0] = 12.0
    progress.update(Summary(total=4, ok=2, failed=1, tokens=40), 20)
    assert stream.getvalue().splitlines() == [
        "diffgen: progress: 0/4 records",
        "diffgen: progress: 3/4 records (1 failed), 3.3 tokens/s, about 4 s left",
    ]
    every = io.StringIO()
    progress = LineProgress(every, interval=0, clock=lambda: now[0])
    for done in range(3):
        progress.update(Summary(total=3, ok=done), 0)
    assert len(every.getvalue().splitlines()) == 3


def test_a_batch_logs_progress_lines_to_a_non_terminal(tiny_checkpoint, tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS), encoding="utf-8")
    result = batch(tiny_checkpoint, str(source), "-o", str(tmp_path / "out.jsonl"), *QUICK)
    assert result.exit_code == 0 and f"diffgen: progress: 0/{len(PROMPTS)} records" in result.stderr
    quiet = batch(tiny_checkpoint, str(source), "-o", str(tmp_path / "quiet.jsonl"), "-q", *QUICK)
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_batch_help_shows_its_defaults():
    result = runner.invoke(app, ["batch", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    assert "[default: (stdout)]" in text and "[default: auto]" in text and "[default: 0]" in text
