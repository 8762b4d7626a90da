"""Where diffgen writes files: one policy for every output it writes (``--trace``, ``--svg``/``--html``
pictures, ``batch -o`` and its settings file, ``chat /save``).

* **Never an input of the same command.** The output is compared with the command's inputs as
  files (another name or a link for the same file counts), before anything is read or loaded.
* **Never an existing file that is not what the command itself writes**, unless the user says so
  (``--overwrite``): a trace may replace a trace, a picture a picture, a saved conversation a saved
  conversation; anything else that exists and is not empty is refused.
* **Written to a temporary file in the same directory and renamed into place**
  (:class:`AtomicFile`, :func:`write_bytes`), so a failed, full or interrupted write leaves the old
  file (or nothing), never half of one. A terminal, a pipe or a character device such as
  ``/dev/stderr`` is written directly: there is no file there to lose. ``batch -o`` appends record by record instead (each
  record is one ``write``; its rewrites go through :func:`write_bytes`).
* **One writer at a time** for outputs that a run keeps open (:func:`lock`): an exclusive advisory
  lock on ``.NAME.lock`` beside the output, holding the pid of its owner, so a second writer
  stops with one line that says which process holds it.

Failures of the file system (a full disk, a read-only mount) are :class:`OutputError`: one line
naming the file, the reason and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Optional

from diffgen.errors import DiffgenError, UsageError


class OutputError(DiffgenError):
    """An output file that cannot be written (full disk, read-only file system, permissions)."""


class OutputLockedError(DiffgenError):
    """Another diffgen process is writing the same output."""


#: errno -> what to do about it, for the one line an OSError becomes.
_ADVICE = {
    errno.ENOSPC: "free some space on that disk, or write somewhere else",
    errno.EDQUOT: "free some space within your quota, or write somewhere else",
    errno.EFBIG: "the file grew past the size this system allows; write somewhere else",
    errno.EROFS: "that file system is read-only; write somewhere else",
    errno.EACCES: "check the permissions, or write somewhere else",
    errno.EPERM: "check the permissions, or write somewhere else",
    errno.EIO: "the device reported an I/O error; check it, or write somewhere else",
}

#: errnos that are the machine's condition, not diffgen's bug (the funnel's one line names them).
ENVIRONMENTAL = frozenset(_ADVICE) | {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENXIO, errno.ETXTBSY}


def advice(exc: OSError) -> str:
    """What to do about ``exc`` (one clause)."""
    return _ADVICE.get(exc.errno or 0, "check the path, or write somewhere else")


def output_error(path: Any, exc: OSError, flag: str = "") -> OutputError:
    """The one-line error for an output ``path`` that could not be written."""
    name = f"{flag} {path}" if flag else str(path)
    return OutputError(f"cannot write {name}: {exc.strerror or exc}", advice(exc))


def same_file(a: Any, b: Any) -> bool:
    """Whether two paths name one file (links and other spellings included); a path that does not
    exist is compared by where it would be."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        try:
            return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
        except (OSError, RuntimeError):
            return False


def check(path: Optional[Path], flag: str, *, inputs: Iterable[Any] = (), ours: Optional[Callable[[Path], bool]] = None,
          kind: str = "file", overwrite: bool = False, override: str = "pass --overwrite to replace it") -> None:
    """Refuse, before anything is read or loaded, an output that would destroy a user's file or
    could not be written (:class:`UsageError`, exit 2).

    ``inputs``: the command's input paths (``None`` and ``-`` are skipped). ``ours(path)``: whether
    an existing file is what this command writes (``kind`` names it, e.g. ``"a diffgen trace"``);
    ``None`` refuses every existing non-empty file. ``overwrite``: the user said to replace it
    (``override`` says how they can).
    """
    if path is None or str(path) == "-":
        return
    target = Path(path).expanduser()
    for source in inputs:
        if source is None or str(source) == "-":
            continue
        if same_file(source, target):
            raise UsageError(f"{flag} {path} is an input of this command ({source})",
                             "write to another file; the input would be destroyed")
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a directory", "give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: the directory {parent} does not exist",
                         f"create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the directory {parent} is not writable",
                         "check its permissions or choose another directory")
    if target.exists():
        if is_stream(target):
            return
        if not target.is_file():
            raise UsageError(f"{flag} {path} is not a regular file", "give the name of a file to write")
        if not overwrite and target.stat().st_size > 0 and (ours is None or not _safely(ours, target)):
            raise UsageError(f"{flag} {path} already exists and is not {kind}",
                             f"{override}, or choose another file")
        if not os.access(target, os.W_OK):
            raise UsageError(f"{flag} {path} is not writable", "check its permissions or choose another file")


def is_stream(path: Path) -> bool:
    """Whether ``path`` is a character device or a pipe (``/dev/stderr``, ``/dev/null``, a FIFO):
    written directly, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _safely(ours: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(ours(path))
    except (OSError, ValueError):
        return False


def head(path: Path, limit: int = 1 << 16) -> bytes:
    """The first ``limit`` bytes of a file (for recognising what it is)."""
    with open(path, "rb") as handle:
        return handle.read(limit)


class AtomicFile:
    """A text file written beside ``path`` and renamed onto it when complete.

    As a context manager: on a clean exit the file is committed (flushed, synced, renamed into
    place), on an exception or after :meth:`discard` it is removed and ``path`` is left as it was.
    A write that fails raises :class:`OutputError` naming ``path``.
    """

    def __init__(self, path: Path, flag: str = "", *, encoding: str = "utf-8"):
        self.path, self.flag = Path(path).expanduser(), flag
        self._done = False
        self.temporary: Optional[str] = None
        try:
            if is_stream(self.path):  # /dev/stderr, a pipe: written as it goes
                self.file: IO[str] = open(self.path, "w", encoding=encoding)  # noqa: SIM115 - closed by commit()
                return
            directory = self.path.parent if str(self.path.parent) else Path(".")
            fd, self.temporary = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as exc:
            raise output_error(path, exc, flag) from exc
        self.file = os.fdopen(fd, "w", encoding=encoding)

    def commit(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            try:
                self.file.flush()
                if self.temporary is not None:
                    os.fsync(self.file.fileno())
            finally:
                self.file.close()
            if self.temporary is not None:
                _keep_mode(self.path, self.temporary)
                os.replace(self.temporary, self.path)
        except OSError as exc:
            self._remove()
            raise output_error(self.path, exc, self.flag) from exc

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self.file.close()
        self._remove()

    def _remove(self) -> None:
        if self.temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temporary)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def write_bytes(path: Path, data: bytes, flag: str = "") -> None:
    """Write ``data`` to ``path`` atomically (a crash or a full disk leaves the old file or the new)."""
    target = Path(path).expanduser()
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".",
                                         prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise output_error(path, exc, flag) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _keep_mode(target, temporary)
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise output_error(path, exc, flag) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_text(path: Path, text: str, flag: str = "") -> None:
    write_bytes(path, text.encode("utf-8"), flag)


def _keep_mode(target: Path, temporary: str) -> None:
    """The new file gets the old file's permissions (mkstemp's are 0600), or the umask's default."""
    try:
        mode = target.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    with contextlib.suppress(OSError):
        os.chmod(temporary, mode)


# -- one writer at a time -------------------------------------------------------------------------


def lock_path(path: Path) -> Path:
    """The lock file of an output: ``out.jsonl`` -> ``.out.jsonl.lock`` beside it."""
    target = Path(path).expanduser()
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def lock(path: Path, flag: str = "") -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` for the body (``fcntl.flock`` on its lock file,
    which holds this process's pid). Another holder is :class:`OutputLockedError` (exit 1) naming
    its pid; the lock goes with the process, whatever ends it. Where ``fcntl`` is missing
    (Windows) the body runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux or macOS
        yield
        return
    where = lock_path(path)
    name = f"{flag} {path}" if flag else str(path)
    while True:
        try:
            fd = os.open(where, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot lock {name}: cannot create {where}: {exc.strerror or exc}",
                              advice(exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"process {holder}" if holder else "another process"
                raise OutputLockedError(f"{name} is being written by {who} (diffgen holds {where})",
                                        "wait for it to finish, or write to another file") from exc
            raise OutputError(f"cannot lock {name}: {exc.strerror or exc}", advice(exc)) from exc
        # The holder before us may have removed the lock file between our open and our lock:
        # then we hold a lock on a file nobody else sees; take it again on the current one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(where))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid is a courtesy for the message; the lock itself holds
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(where)
        os.close(fd)


def _holder(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
