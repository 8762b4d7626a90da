"""Batch jobs: JSONL or plain-text prompts in, one JSONL record per prompt out, nothing lost.

* Input: JSONL objects (``id``, ``prompt`` and optional per-record settings, see
  :data:`RECORD_FIELDS`) or plain text (one prompt per line; the id is the line number).
* Jobs with the same generation settings are generated together, left padded, in batches of
  ``batch_size``; every row draws from its own generator seeded from the record (its ``seed``,
  or one derived from the base seed and its id), so a record's output does not depend on its
  neighbours or the batch size.
* Output: each finished record is appended as one line with a single ``write`` on an
  ``O_APPEND`` descriptor, as soon as its batch is done. Opening an existing output drops a
  torn last line (a ``kill -9`` in the middle of a write), and ``resume`` skips what is there.
* Bad input never stops the job: a malformed line, an unknown field, a duplicate id or a
  record that fails becomes an error record with its line number.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from diffgen.errors import DiffgenError, UsageError
from diffgen.settings import SAMPLER_FLAGS, GenerationSettings

# Record field -> (accepted types, GenerationSettings field or None for prompt-level fields);
# the generation fields come from the one flag table in diffgen.settings.
RECORD_FIELDS: dict[str, tuple[tuple[type, ...], str | None]] = {
    "id": ((str, int), None),
    "prompt": ((str,), None),
    "system": ((str,), None),
    "think": ((bool,), None),
    "raw": ((bool,), None),
    "seed": ((int,), None),
    **{flag.key: (flag.types, flag.field) for flag in SAMPLER_FLAGS},
}


@dataclass(frozen=True)
class Job:
    """One prompt to generate. ``line`` is its input line number (from 1)."""

    line: int
    id: str | int
    prompt: str
    system: str | None = None
    think: bool = False
    raw: bool = False
    seed: int | None = None
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class InputError:
    """A line that cannot become a job; ``id`` when the line named one."""

    line: int
    message: str
    id: str | int | None = None


def derive_seed(base_seed: int, record_id: str | int) -> int:
    """A record's seed from the base seed and its id (stable across runs and machines)."""
    digest = hashlib.sha256(f"{base_seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def sniff_format(first_line: str, name: str) -> str:
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return "jsonl" if first_line.lstrip().startswith("{") else "text"


def parse(lines: Sequence[str], fmt: str = "auto", name: str = "-") -> Iterator[Job | InputError]:
    """Jobs and input errors, in input order; duplicate ids after the first are errors."""
    first = next((line for line in lines if line.strip()), "")
    if fmt == "auto":
        fmt = sniff_format(first, name)
    seen: dict[str | int, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item = _parse_jsonl(number, line) if fmt == "jsonl" else Job(line=number, id=number, prompt=line.rstrip("\r\n"))
        if isinstance(item, Job):
            if item.id in seen:
                item = InputError(number, f"duplicate id {item.id!r} (first on line {seen[item.id]})", item.id)
            else:
                seen[item.id] = number
        yield item


def _parse_jsonl(number: int, line: str) -> Job | InputError:
    try:
        data = json.loads(line)
    except ValueError as exc:
        return InputError(number, f"not valid JSON: {exc}")
    if not isinstance(data, dict):
        return InputError(number, "a record must be a JSON object")
    record_id = data.get("id")
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        return InputError(number, "missing or invalid 'id' (a string or an integer)")
    unknown = sorted(set(data) - set(RECORD_FIELDS))
    if unknown:
        return InputError(number, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(RECORD_FIELDS)}",
                          record_id)
    for key, value in data.items():
        types = RECORD_FIELDS[key][0]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return InputError(number, f"field {key!r} must be {' or '.join(t.__name__ for t in types)}", record_id)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return InputError(number, "missing or empty 'prompt'", record_id)
    overrides = tuple(sorted((RECORD_FIELDS[k][1], v) for k, v in data.items() if RECORD_FIELDS[k][1]))
    return Job(line=number, id=record_id, prompt=prompt, system=data.get("system"), think=data.get("think", False),
               raw=data.get("raw", False), seed=data.get("seed"), overrides=overrides)


# -- the output file ---------------------------------------------------------------------------


class Output:
    """JSONL output: stdout, or a file appended to record by record (crash-safe lines)."""

    def __init__(self, path: Path | None, *, resume: bool, overwrite: bool, stdout: IO[str]):
        self.path = path
        self.stdout = stdout
        self.done_ids: set[Any] = set()
        self.done_lines: set[int] = set()
        self._fd: int | None = None
        if path is None:
            if resume:
                raise UsageError("--resume needs -o OUTPUT (there is nothing to resume on stdout)")
            return
        exists = path.exists() and path.stat().st_size > 0
        if exists and not (resume or overwrite):
            raise UsageError(f"{path} already exists", "pass --resume to continue it or --overwrite to replace it")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        if overwrite and not resume:
            flags |= os.O_TRUNC
        elif exists:
            self._repair_and_scan(path)
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def _repair_and_scan(self, path: Path) -> None:
        """Drop a torn last line; remember which ids and input lines are done."""
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(path, "r+b") as handle:
                handle.truncate(keep)
        for raw in data[:keep].splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if record.get("input_error"):
                self.done_lines.add(record.get("line"))
            else:
                self.done_ids.add(record.get("id"))

    def is_done(self, item: Job | InputError) -> bool:
        if isinstance(item, InputError):
            return item.line in self.done_lines
        return item.id in self.done_ids

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._fd is None:
            self.stdout.write(line)
            self.stdout.flush()
            return
        data = line.encode("utf-8")
        written = os.write(self._fd, data)
        while written < len(data):  # a short write to a regular file is rare; finish the line
            written += os.write(self._fd, data[written:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- running -------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What a batch run did. ``tokens`` counts generated tokens of successful records."""

    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    tokens: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.ok + self.failed


def error_record(item: Job | InputError, message: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": item.id, "line": item.line, "error": message}
    if isinstance(item, InputError):
        record["input_error"] = True
    return record


def job_settings(job: Job, defaults: GenerationSettings) -> GenerationSettings:
    """The record's settings: its own fields over the command-line defaults."""
    return defaults.replace(**dict(job.overrides), seed=None)


def plan_batches(jobs: Iterable[tuple[Job, GenerationSettings, list[int]]],
                 batch_size: int) -> Iterator[list[tuple[Job, GenerationSettings, list[int]]]]:
    """Group jobs with equal settings into batches of at most ``batch_size``, in input order of
    each group's first job."""
    groups: dict[GenerationSettings, list[tuple[Job, GenerationSettings, list[int]]]] = {}
    for item in jobs:
        groups.setdefault(item[1], []).append(item)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start:start + batch_size]


def run(items: Sequence[Job | InputError], *, encode: Callable[[Job, GenerationSettings], list[int]],
        generate_batch: Callable[[list[list[int]], GenerationSettings, list[int]], Sequence[dict[str, Any]]],
        defaults: GenerationSettings, base_seed: int, batch_size: int, output: Output,
        progress: Callable[[Summary, int], None] = lambda summary, tokens: None) -> Summary:
    """Run every item not already in ``output``; write one record per item.

    ``encode(job, settings)`` turns a job into token ids (raising :class:`DiffgenError` for a
    bad prompt, e.g. one too long for the context);
    ``generate_batch(prompts, settings, seeds)`` returns one result dict per prompt. A batch
    that fails is retried record by record, so one bad record cannot take its neighbours down.
    """
    summary = Summary(total=len(items))
    ready = []
    for item in items:
        if output.is_done(item):
            summary.skipped += 1
            continue
        if isinstance(item, InputError):
            _fail(summary, output, item, item.message)
            continue
        try:
            settings = job_settings(item, defaults)
            ids = encode(item, settings)
        except DiffgenError as exc:
            _fail(summary, output, item, str(exc))
            continue
        ready.append((item, settings, ids))
    progress(summary, 0)
    for batch in plan_batches(ready, batch_size):
        try:
            results: list[Any] = _generate(batch, generate_batch, base_seed)
        except Exception as exc:  # noqa: BLE001 - any failure of a batch is retried record by record
            results = [exc] if len(batch) == 1 else [_generate_one(job, generate_batch, base_seed) for job in batch]
        tokens = 0
        for (job, _, _), result in zip(batch, results):
            if isinstance(result, Exception):
                _fail(summary, output, job, _describe(result))
                continue
            output.write({"id": job.id, "line": job.line, **result})
            summary.ok += 1
            tokens += len(result.get("tokens", ()))
        summary.tokens += tokens
        progress(summary, tokens)
    return summary


def seed_for(job: Job, base_seed: int) -> int:
    return job.seed if job.seed is not None else derive_seed(base_seed, job.id)


def _generate(batch, generate_batch, base_seed) -> list[Any]:
    seeds = [seed_for(job, base_seed) for job, _, _ in batch]
    return list(generate_batch([ids for _, _, ids in batch], batch[0][1], seeds))


def _generate_one(item, generate_batch, base_seed) -> Any:
    try:
        return _generate([item], generate_batch, base_seed)[0]
    except Exception as exc:  # noqa: BLE001 - becomes this record's error
        return exc


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, DiffgenError) else f"{type(exc).__name__}: {exc}".splitlines()[0]


def _fail(summary: Summary, output: Output, item: Job | InputError, message: str) -> None:
    output.write(error_record(item, message))
    summary.failed += 1
    summary.failures.append(f"line {item.line}: {message}")
