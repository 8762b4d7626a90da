"""The batch runners: every record of a ``batch`` input generated, locally in batches
(:func:`run`) or as concurrent requests to a server (:func:`run_concurrent`), one output record
each, nothing lost. The input and output formats are :mod:`diffgen.records.batch`'s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import typer

from diffgen.errors import DiffgenError
from diffgen.records.batch import InputError, Job, Output, error_record, job_settings, seed_for
from diffgen.settings import GenerationSettings

if TYPE_CHECKING:
    from rich.console import Console


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
            results: list[dict[str, Any] | Exception] = _generate(batch, generate_batch, base_seed)
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


def _generate(batch, generate_batch, base_seed) -> list[dict[str, Any]]:
    seeds = [seed_for(job, base_seed) for job, _, _ in batch]
    return list(generate_batch([ids for _, _, ids in batch], batch[0][1], seeds))


def _generate_one(item, generate_batch, base_seed) -> dict[str, Any] | Exception:
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


def run_concurrent(items: Sequence[Job | InputError], *, send: Callable[[Job], dict[str, Any]], output: Output,
                   concurrency: int, fatal: Callable[[BaseException], bool] = lambda exc: False,
                   progress: Callable[[Summary, int], None] = lambda summary, tokens: None) -> Summary:
    """Run every item not already in ``output`` through ``send(job)`` (one request to a server,
    returning the record's fields), with at most ``concurrency`` requests in flight; write one
    record per item as its answer arrives.

    Threads rather than asyncio: the requests block on the network, not the CPU, and a thread
    per request in flight keeps ``send`` an ordinary function (the same one a test calls).
    Records are written from this thread only, so their lines never interleave. A failure of one
    request becomes its error record (``--resume`` retries it); one for which ``fatal(exc)`` is
    true (the server cannot be reached) stops the run: nothing more is sent, the answers in
    flight are written as they arrive, and the exception is raised, so that the records not
    done are simply absent and ``--resume`` does them.
    """
    import queue
    import threading

    summary = Summary(total=len(items))
    todo: list[Job] = []
    for item in items:
        if output.is_done(item):
            summary.skipped += 1
        elif isinstance(item, InputError):
            _fail(summary, output, item, item.message)
        else:
            todo.append(item)
    progress(summary, 0)
    stop: BaseException | None = None
    pending = iter(todo)
    answers: queue.Queue = queue.Queue()

    def launch(job: Job) -> None:
        # Daemon threads, not a ThreadPoolExecutor: on Ctrl-C the process must not wait at exit for
        # requests still in flight (a pool's workers are joined at interpreter shutdown, and a
        # generation may take minutes); their connections close with the process, which tells
        # the server to drop their rows.
        def work() -> None:
            try:
                answers.put((job, send(job), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the writer below
                answers.put((job, None, exc))

        threading.Thread(target=work, name="diffgen-request", daemon=True).start()

    in_flight = 0
    for job in pending:
        launch(job)
        in_flight += 1
        if in_flight >= concurrency:
            break
    while in_flight:
        job, result, exc = answers.get()
        in_flight -= 1
        if exc is None:
            output.write({"id": job.id, "line": job.line, **result})
            summary.ok += 1
            tokens = len(result.get("tokens") or ())
            summary.tokens += tokens
            progress(summary, tokens)
        elif fatal(exc):
            stop = stop or exc
        else:
            _fail(summary, output, job, _describe(exc))
            progress(summary, 0)
        if stop is None:
            following = next(pending, None)
            if following is not None:
                launch(following)
                in_flight += 1
    if stop is not None:
        raise stop
    return summary


# -- progress on stderr --------------------------------------------------------------------------

# Seconds between progress lines when stderr is not a terminal (a log file, CI, nohup).
PROGRESS_INTERVAL = 5.0


def with_progress(console: Console, show: bool, go: Callable[[Callable[[Summary, int], None]], Summary]) -> Summary:
    """``go(progress)``, a runner's run, with a progress bar (or, when stderr is not a terminal,
    a line now and then) and a summary line on stderr when ``show``."""
    start = time.perf_counter()
    progress: Progress | LineProgress | None = None
    if show:
        progress = Progress(console) if console.is_terminal else LineProgress(sys.stderr, PROGRESS_INTERVAL)
    try:
        summary = go(progress.update if progress else lambda summary, tokens: None)
    finally:
        if progress:
            progress.stop()
    if show:
        summary_line(summary, time.perf_counter() - start)
    return summary


def summary_line(summary: Summary, elapsed: float) -> None:
    typer.echo(
        f"diffgen: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped of {summary.total} "
        f"records in {elapsed:.1f} s ({summary.done / elapsed if elapsed else 0:.2f} records/s, "
        f"{summary.tokens / elapsed if elapsed else 0:.1f} tokens/s)",
        err=True,
    )


class Progress:
    """A Rich progress bar on stderr: records done/total, tokens/s, ETA."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("records"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} tok/s"),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None
        self.start = time.perf_counter()
        self.progress.start()

    def update(self, summary: Summary, tokens: int) -> None:
        todo = summary.total - summary.skipped
        if self.task is None:
            self.task = self.progress.add_task("records", total=todo, rate="0.0")
        elapsed = time.perf_counter() - self.start
        self.progress.update(self.task, completed=summary.done,
                             rate=f"{summary.tokens / elapsed if elapsed else 0:.1f}")

    def stop(self) -> None:
        self.progress.stop()


class LineProgress:
    """Progress for a stderr that is not a terminal (a log file, CI, ``nohup``): one plain line
    at the start and then at most one every ``interval`` seconds, so a long job shows it is alive
    without flooding the log. ``clock`` is injectable so tests need no waiting."""

    def __init__(self, stream: IO[str], interval: float, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.start = clock()
        self.last: float | None = None

    def update(self, summary: Summary, tokens: int) -> None:
        now = self.clock()
        todo = summary.total - summary.skipped
        if not todo or (self.last is not None and now - self.last < self.interval):
            return
        self.last = now
        elapsed = now - self.start
        line = f"diffgen: progress: {summary.done}/{todo} records"
        if summary.failed:
            line += f" ({summary.failed} failed)"
        if elapsed > 0 and summary.done:
            line += f", {summary.tokens / elapsed:.1f} tokens/s"
            left = elapsed / summary.done * (todo - summary.done)
            line += f", about {duration(left)} left" if todo > summary.done else ""
        self.stream.write(line + "\n")
        self.stream.flush()

    def stop(self) -> None:
        pass


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
