"""The batch file formats: JSONL or plain-text prompts in, one JSONL record per prompt out.

The runners that generate them are :mod:`diffgen.cli.support.batch_runner`.

* Input: JSONL objects (``id``, ``prompt`` and optional per-record settings and images — ``image``
  one path, ``images`` a list, relative to the input file — see :data:`RECORD_FIELDS`) or plain text (one prompt per line; the id is the line number). A
  UTF-8 BOM is dropped. :func:`detect_format` decides on the whole input, never on one line.
  An id keeps its JSON type: ``3`` and ``"3"`` are two records with two seeds.
* Jobs with the same generation settings are generated together, left padded, in batches of
  ``batch_size``; every row draws from its own generator seeded from the record (its ``seed``,
  or one derived from the base seed and its id), so a record's output does not depend on its
  neighbours or the batch size.
* Output: each finished record is appended as one line with a single ``write`` on an
  ``O_APPEND`` descriptor, as soon as its batch is done. Opening an existing output drops a
  torn last line (a ``kill -9`` in the middle of a write); ``resume`` skips the records that
  succeeded and retries those whose last result was an error (their error records are
  dropped first, by an atomic rewrite, so every id ends with exactly one record).
* The settings an output was written with live beside it in ``<output>.settings.json``
  (:func:`settings_path`, written atomically), so a resume can refuse to mix settings.
* Bad input never stops the job: a malformed line, an unknown field, a duplicate id or a
  record that fails becomes an error record with its line number.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from diffgen.errors import UsageError
from diffgen.settings import SAMPLER_FLAGS, GenerationSettings, input_problem

# Record field -> (accepted types, GenerationSettings field or None for prompt-level fields);
# the generation fields come from the one flag table in diffgen.settings.
RECORD_FIELDS: dict[str, tuple[tuple[type, ...], str | None]] = {
    "id": ((str, int), None),
    "prompt": ((str,), None),
    "system": ((str,), None),
    "think": ((bool,), None),
    "raw": ((bool,), None),
    "seed": ((int,), None),
    "image": ((str,), None),
    "images": ((list,), None),
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
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class InputError:
    """A line that cannot become a job; ``id`` when the line named one."""

    line: int
    message: str
    id: str | int | None = None


def id_key(record_id: Any) -> str:
    """An id as its JSON text, so that ``3`` and ``"3"`` stay apart wherever ids are compared."""
    return json.dumps(record_id, ensure_ascii=False)


def derive_seed(base_seed: int, record_id: str | int) -> int:
    """A record's seed from the base seed and its id, JSON type included (stable across runs
    and machines; ``3`` and ``"3"`` get different seeds)."""
    digest = hashlib.sha256(f"{base_seed}:{id_key(record_id)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
FORMAT_RULE = ("auto reads JSONL when the file is named *.jsonl, *.ndjson or *.json, or when every line is a JSON "
               "object; text when no line is; a mix is JSONL only if its first line and most lines are objects "
               "(the other lines become error records), and is otherwise refused: say --format")


def input_lines(text: str) -> list[str]:
    """The input's lines, without a UTF-8 byte order mark (which editors on Windows write).

    Split at ``\n`` only (a ``\r`` before it goes too): ``str.splitlines`` would also split at
    form feeds and U+2028, which a prompt or a JSON string may hold."""
    lines = text.removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _is_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def detect_format(lines: Sequence[str], name: str) -> str:
    """``"jsonl"`` or ``"text"`` for ``--format auto``, decided on the whole input (see
    :data:`FORMAT_RULE`); raises :class:`UsageError` when the input could be either.

    One line never decides alone: a text file whose first prompt starts with ``{`` is text,
    and JSON lines are never read as text prompts without a word.
    """
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    objects = [number for number, line in numbered if _is_object(line)]
    if len(objects) == len(numbered):
        return "jsonl"
    if not objects:
        return "text"
    if objects[0] == numbered[0][0] and 2 * len(objects) > len(numbered):
        return "jsonl"
    others = [number for number, _ in numbered if number not in set(objects)]
    raise UsageError(
        f"cannot tell whether {name} is JSONL or text: {_lines(objects)} {'is a JSON object' if len(objects) == 1 else 'are JSON objects'}, "
        f"{_lines(others)} {'is' if len(others) == 1 else 'are'} not",
        "pass --format jsonl (the other lines become error records) or --format text (every line is a prompt)")


def _lines(numbers: Sequence[int]) -> str:
    shown = ", ".join(map(str, numbers[:3])) + (f" and {len(numbers) - 3} more" if len(numbers) > 3 else "")
    return ("line " if len(numbers) == 1 else "lines ") + shown


def parse(lines: Sequence[str], fmt: str = "auto", name: str = "-") -> Iterator[Job | InputError]:
    """Jobs and input errors, in input order; duplicate ids after the first are errors.

    ``fmt`` is ``"jsonl"``, ``"text"`` or ``"auto"`` (:func:`detect_format`, which may raise
    :class:`UsageError`)."""
    if fmt == "auto":
        fmt = detect_format(lines, name)
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item = _parse_jsonl(number, line) if fmt == "jsonl" else Job(line=number, id=number, prompt=line.rstrip("\r\n"))
        if isinstance(item, Job):
            key = id_key(item.id)
            if key in seen:
                item = InputError(number, f"duplicate id {key} (first on line {seen[key]})", item.id)
            else:
                seen[key] = number
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
    for key, value in data.items():
        field = "seed" if key == "seed" else RECORD_FIELDS[key][1]
        problem = input_problem(field, value) if field else None
        if problem:  # the checks of the command line's flags (--seed -1 is refused there too)
            return InputError(number, f"field {key!r} {problem}", record_id)
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return InputError(number, "missing or empty 'prompt'", record_id)
    if "image" in data and "images" in data:
        return InputError(number, "give 'image' (one path) or 'images' (a list), not both", record_id)
    images = [data["image"]] if "image" in data else data.get("images", [])
    if not all(isinstance(path, str) and path for path in images):
        return InputError(number, "field 'images' must be a list of image paths", record_id)
    if images and data.get("raw"):
        return InputError(number, "images need the chat template, which places them; drop 'raw'", record_id)
    overrides = tuple(sorted((RECORD_FIELDS[k][1], v) for k, v in data.items() if RECORD_FIELDS[k][1]))
    return Job(line=number, id=record_id, prompt=prompt, system=data.get("system"), think=data.get("think", False),
               raw=data.get("raw", False), seed=data.get("seed"), overrides=overrides, images=tuple(images))


# -- the output file ---------------------------------------------------------------------------


def settings_path(output: Path) -> Path:
    """Where the settings of ``output`` are kept: ``out.jsonl`` -> ``out.jsonl.settings.json``."""
    return output.with_name(output.name + ".settings.json")


def read_settings(output: Path) -> dict[str, Any] | None:
    """The settings file of ``output``; ``None`` when there is none."""
    path = settings_path(output)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}", "restore it, or pass --overwrite to start over") from exc
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise UsageError(f"{path} is not a diffgen settings file", "restore it, or pass --overwrite to start over")
    return data


def write_settings(output: Path, data: dict[str, Any]) -> None:
    """Write the settings file of ``output`` atomically (a crash leaves the old file or the new)."""
    _write_atomically(settings_path(output), (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def changed_settings(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored, current)}`` for every setting whose value differs (JSON-normalised)."""
    normal = json.loads(json.dumps(current))
    return {key: (stored.get(key), current[key]) for key in current if stored.get(key) != normal[key]}


def _write_atomically(path: Path, data: bytes) -> None:
    from diffgen import outputs

    outputs.write_bytes(path, data)


def is_settings_file(path: Path) -> bool:
    """Whether ``path`` holds a settings file diffgen wrote (one that a new output may replace)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("settings"), dict)


def check_output(output: Path | None, input_path: str, *, resume: bool, overwrite: bool,
                 inputs: Sequence[Any] = ()) -> None:
    """Everything about ``-o`` that can be refused before a model is read (usage errors, exit 2):
    conflicting flags, a missing or read-only directory, a read-only output, the input itself (or
    another input of the command, ``inputs``), a settings file beside it that diffgen did not write."""
    from diffgen import outputs

    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other",
                         "--resume continues OUTPUT, --overwrite replaces it: pass one")
    if output is None:
        if resume:
            raise UsageError("--resume needs -o OUTPUT (there is nothing to resume on stdout)")
        return
    if input_path != "-" and outputs.same_file(Path(input_path), output):
        raise UsageError(f"-o {output} is the input file itself",
                         "write the records to another file; the prompts would be lost")
    for other in inputs:
        if other is not None and outputs.same_file(other, output):
            raise UsageError(f"-o {output} is an input of this command ({other})",
                             "write the records to another file; the input would be destroyed")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {output}: the directory {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {output}: cannot write in the directory {parent} (permission denied)")
    exists = output.exists() and output.stat().st_size > 0
    if exists and not (resume or overwrite):
        raise UsageError(f"{output} already exists", "pass --resume to continue it or --overwrite to replace it")
    for other in (input_path, *inputs):
        if other is not None and other != "-" and outputs.same_file(other, settings_path(output)):
            raise UsageError(f"-o {output}: its settings file {settings_path(output)} would replace an input of "
                             "this command", "write the records to another file")
    outputs.check(settings_path(output), "-o", ours=is_settings_file, kind="a diffgen settings file",
                  overwrite=overwrite, override="pass --overwrite to replace it (and the output)")
    if output.exists():
        try:  # the real test: os.access says yes to root even where the file system says no
            os.close(os.open(output, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror or exc}",
                             "make it writable, or write to another file") from exc


class Output:
    """JSONL output: stdout, or a file appended to record by record (crash-safe lines).

    Opening an existing file (``resume``) drops a torn last line and the error records, and
    remembers which ids (and, for input errors, which lines) already succeeded."""

    def __init__(self, path: Path | None, *, resume: bool, overwrite: bool, stdout: IO[str]):
        self.path = path
        self.stdout = stdout
        self.done_ids: set[str] = set()  # id_key()s of the records that succeeded
        self.retry_ids: set[str] = set()  # id_key()s whose last result was an error
        self.retry_lines: set[int] = set()  # input lines whose last result was an input error
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
            self._scan_and_compact(path)
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def _scan_and_compact(self, path: Path) -> None:
        """Keep whole lines of records that succeeded; remember what is done and what to retry."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        kept: list[bytes] = []
        lines = data.splitlines(keepends=True)
        for raw in lines:
            if not raw.endswith(b"\n"):
                continue  # torn by a kill in the middle of a write
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                kept.append(raw)  # not a record of ours: leave it as it is
                continue
            key = id_key(record.get("id"))
            if "error" in record:
                if record.get("input_error"):
                    self.retry_lines.add(record.get("line"))
                else:
                    self.retry_ids.add(key)
                    self.done_ids.discard(key)
                continue
            self.done_ids.add(key)
            self.retry_ids.discard(key)
            kept.append(raw)
        if len(kept) != len(lines):
            _write_atomically(path, b"".join(kept))

    @property
    def retrying(self) -> int:
        """How many earlier failures this run retries (records and input lines)."""
        return len(self.retry_ids) + len(self.retry_lines)

    def is_done(self, item: Job | InputError) -> bool:
        if isinstance(item, InputError):
            return False  # an input error is evaluated again: the input may have been fixed
        return id_key(item.id) in self.done_ids

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._fd is None:
            self.stdout.write(line)
            self.stdout.flush()
            return
        data = line.encode("utf-8")
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # a short write to a regular file is rare; finish the line
                written += os.write(self._fd, data[written:])
        except OSError as exc:  # a full disk: one line naming the output (a torn line is dropped by --resume)
            from diffgen import outputs

            raise outputs.output_error(self.path, exc, "-o") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- records ---------------------------------------------------------------------------------------


def error_record(item: Job | InputError, message: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": item.id, "line": item.line, "error": message}
    if isinstance(item, InputError):
        record["input_error"] = True
    return record


def job_settings(job: Job, defaults: GenerationSettings) -> GenerationSettings:
    """The record's settings: its own fields over the command-line defaults."""
    return defaults.replace(**dict(job.overrides), seed=None)


def seed_for(job: Job, base_seed: int) -> int:
    return job.seed if job.seed is not None else derive_seed(base_seed, job.id)
