"""The quantised-weights cache: what quantisation produced, kept on disk so later loads skip it.

The first load of a checkpoint under a quantised scheme (``int8``, ``fp8``, ``nf4``, ``nf4-all``)
writes the quantised modules' buffers — payloads and scales, nothing the checkpoint already
holds — as safetensors files into a cache entry; later loads copy them straight into the
modules on the device and read only the unquantised tensors from the checkpoint's shards. An
entry costs about the quantised experts' size on disk, not a second copy of the model.

Where: ``$DIFFGEN_CACHE/quantized``, else ``$XDG_CACHE_HOME/diffgen/quantized``, else
``~/.cache/diffgen/quantized``. ``DIFFGEN_QUANT_CACHE=0`` turns the cache off.

The key: the checkpoint's identity (a Hub snapshot: its repository and revision hash; a local
directory: its path and the names, sizes and modification times of its weight files), the
scheme, the compute dtype, :data:`FORMAT_VERSION` and ``quant.QUANT_LAYOUT_VERSION``. An entry
is a directory named after the key, holding one safetensors file per layer and ``manifest.json``.

Safety: an entry is written into a temporary directory, layer by layer as the load completes
them, and renamed into place only when whole, so a crash, Ctrl-C or a concurrent run never
leaves half an entry that is later trusted. On read, the manifest must match the key and the
tensors the modules expect (names, shapes, dtypes), and every file its recorded size; if not,
the entry is ignored with one warning and rebuilt. Contents are not checksummed: hashing tens
of GB on every load would cost much of what the cache saves, and a flipped bit would go
unnoticed in the checkpoint itself just the same. When the cache cannot be written (read-only,
disk full, ...) the load warns once and goes on without it: the cache never fails a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
SWITCH_VARIABLE = "DIFFGEN_QUANT_CACHE"
MANIFEST = "manifest.json"
# Free disk space an entry must leave behind, so that the cache never fills a disk.
DISK_RESERVE = 1 << 30
# Temporary directories of runs that died without cleaning up are removed after a day.
STALE_AFTER_S = 24 * 3600
_TEMP_PREFIX = ".tmp-"
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")
_warned: set[str] = set()


def enabled() -> bool:
    """Whether the cache is on (``DIFFGEN_QUANT_CACHE`` unset or not ``0``/``false``/``no``/``off``)."""
    return os.environ.get(SWITCH_VARIABLE, "").strip().lower() not in {"0", "false", "no", "off"}


def cache_home() -> Path:
    """diffgen's cache directory: ``$DIFFGEN_CACHE``, else ``$XDG_CACHE_HOME/diffgen``, else ``~/.cache/diffgen``."""
    if os.environ.get("DIFFGEN_CACHE"):
        return Path(os.environ["DIFFGEN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "diffgen"


def cache_root() -> Path:
    """Where the quantised-weights entries live."""
    return cache_home() / "quantized"


def warn(message: str, kind: str) -> None:
    """``diffgen: warning: message`` on stderr, once per ``kind`` per process."""
    if kind in _warned:
        return
    _warned.add(kind)
    print(f"diffgen: warning: {message}", file=sys.stderr, flush=True)


# -- the key ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    """What a cache entry's contents depend on.

    Attributes:
        checkpoint: the checkpoint's identity: ``hub:<models--org--name>@<revision>`` for a Hub
            snapshot, ``local:<sha256>`` for a directory (of its resolved path and its weight files'
            names, sizes in bytes and modification times in ns).
        scheme: the plan's quantisation (``int8``, ``fp8``, ``nf4``, ``nf4-all``).
        dtype: the plan's compute dtype name (``bfloat16``, ...).
        layout: ``quant.QUANT_LAYOUT_VERSION`` of the code that wrote the entry.
        format: :data:`FORMAT_VERSION` of the code that wrote the entry.
        label: a readable name for the entry's directory (the repository or the directory name);
            not part of the identity.
    """

    checkpoint: str
    scheme: str
    dtype: str
    layout: int
    format: int = FORMAT_VERSION
    label: str = "checkpoint"

    def fields(self) -> dict[str, Any]:
        """The fields that decide whether an entry fits (everything but the label)."""
        fields = asdict(self)
        fields.pop("label")
        return fields

    @property
    def name(self) -> str:
        """The entry's directory name: readable label and scheme, then a digest of the key."""
        digest = hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:16]
        label = re.sub(r"[^A-Za-z0-9._-]+", "_", self.label)[:64] or "checkpoint"
        return f"{label}-{self.scheme}-{digest}"


def checkpoint_identity(path: Path, weight_files: list[Path]) -> tuple[str, str]:
    """``(identity, label)`` of the checkpoint in ``path`` (see :class:`CacheKey`).

    A Hub snapshot (``.../models--org--name/snapshots/<revision>/``) is named by its revision,
    which fixes its files. A local directory is named by a digest of its resolved path and its
    weight files' names, sizes and modification times: rewriting a file changes the key. The path
    is in the digest so that two directories whose files merely look alike (copies with kept
    times of different fine-tunes) never share an entry; moving a directory costs one rebuild.
    """
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        repo = path.parent.parent.name
        return f"hub:{repo}@{path.name}", repo.removeprefix("models--")
    digest = hashlib.sha256(str(path.resolve()).encode())
    for file in sorted(weight_files):
        try:
            stat = file.stat()
            facts = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:  # a missing shard: the load reports it; the key just differs
            facts = "missing"
        digest.update(f"\0{file.name}\0{facts}".encode())
    return f"local:{digest.hexdigest()}", path.resolve().name


def checkpoint_key(path: Path, weight_files: list[Path], scheme: str, dtype: str) -> CacheKey:
    """The key of ``path``'s entry for ``scheme`` computing in ``dtype``."""
    from diffgen.loading.quant import QUANT_LAYOUT_VERSION

    identity, label = checkpoint_identity(path, weight_files)
    return CacheKey(identity, scheme, dtype, QUANT_LAYOUT_VERSION, FORMAT_VERSION, label)


# -- what is cached --------------------------------------------------------------------------------


def module_tensors(modules: dict[str, Any]) -> dict[str, Any]:
    """Every persistent buffer of the quantised ``modules`` (name -> module), by its full name."""
    return {f"{prefix}.{name}": tensor for prefix, module in modules.items()
            for name, tensor in module.state_dict(keep_vars=True).items()}


def _describe(tensor: Any) -> dict[str, Any]:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}


def _group(name: str) -> str:
    """The file a module's tensors go to: its layer (``model.decoder.layers.3``), else its own name."""
    match = _LAYER.match(name + ".")
    return match.group(1) if match else name


# -- an entry --------------------------------------------------------------------------------------


class QuantCache:
    """The cache entry for one key: look it up, read it into modules, or write it.

    Attributes:
        key: the entry's :class:`CacheKey`.
        root: the directory holding the entries.
        directory: this entry's directory (``root / key.name``).
        stale: whether an entry exists there but cannot be used (it is replaced when rewritten).
    """

    def __init__(self, key: CacheKey, root: Path | None = None):
        self.key = key
        self.root = Path(root) if root is not None else cache_root()
        self.directory = self.root / key.name
        self.stale = False

    def lookup(self, modules: dict[str, Any]) -> dict[str, Any] | None:
        """The entry's manifest if it exists and fits the key and ``modules``; ``None`` if it does
        not exist or does not fit (then with one warning, and marked :attr:`stale`)."""
        if not self.directory.exists():
            return None
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text(encoding="utf-8"))
            problem = self._problem(manifest, modules)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            manifest, problem = None, f"its manifest is unreadable ({type(exc).__name__})"
        if problem:
            self._reject(problem)
            return None
        return manifest

    def _problem(self, manifest: dict[str, Any], modules: dict[str, Any]) -> str | None:
        if manifest.get("key") != self.key.fields():
            return "it was written for another key"
        found: dict[str, Any] = {}
        for file, entry in manifest["files"].items():
            path = self.directory / file
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                return f"{file} is missing or not the size it was written with"
            found.update(entry["tensors"])
        expected = {name: _describe(tensor) for name, tensor in module_tensors(modules).items()}
        if found != expected:
            return "its tensors are not the ones this model's quantised modules hold"
        return None

    def _reject(self, problem: str) -> None:
        self.stale = True
        warn(f"ignoring the quantised-weights cache {self.directory} ({problem}); rebuilding it", "stale")

    def read(self, manifest: dict[str, Any], modules: dict[str, Any], *,
             on_file: Callable[[], None] | None = None) -> bool:
        """Copy every cached tensor into its module's buffer; ``False`` (with a warning, marked
        :attr:`stale`) when a file turns out damaged, and the buffers must be filled anew.

        Each file is opened as a memory map on the host and each tensor copied from the map into
        the buffer already on the plan's device: no host copy, and unlike ``safe_open(device=
        "cuda")`` no second copy of the tensor on the device next to the buffer it fills.
        """
        import torch
        from safetensors import safe_open

        buffers = module_tensors(modules)
        try:
            for file, entry in manifest["files"].items():
                with safe_open(str(self.directory / file), framework="pt", device="cpu") as handle:
                    if set(handle.keys()) != set(entry["tensors"]):
                        raise ValueError(f"{file} holds other tensors than its manifest lists")
                    for name in entry["tensors"]:
                        value, target = handle.get_tensor(name), buffers[name]
                        if value.shape != target.shape or value.dtype != target.dtype:
                            raise ValueError(f"{name} in {file} is {value.dtype} {list(value.shape)}")
                        with torch.no_grad():
                            target.copy_(value)
                if on_file is not None:
                    on_file()
        except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never fatal
            self._reject(f"{type(exc).__name__}: {exc}".splitlines()[0])
            return False
        return True

    def writer(self, modules: dict[str, Any], *, announce: bool = False) -> CacheWriter | None:
        """A writer for this entry, or ``None`` (with one warning) when the cache cannot be written
        (it cannot be created, or the disk lacks the entry's size plus :data:`DISK_RESERVE`)."""
        tensors = module_tensors(modules)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(self.root)
            free = shutil.disk_usage(self.root).free
            if free < size + DISK_RESERVE:
                from diffgen.planning.sizes import human

                warn(f"not writing the quantised-weights cache: it needs {human(size)} and "
                     f"{self.root} has {human(free)} free; loading without it", "write")
                return None
            temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{self.key.name}-", dir=self.root))
        except OSError as exc:
            warn(f"cannot write the quantised-weights cache in {self.root} ({exc.strerror or exc}); "
                 f"loading without it (set {SWITCH_VARIABLE}=0 to stop trying)", "write")
            return None
        if announce:
            from diffgen.planning.sizes import human

            print(f"diffgen: caching the {self.key.scheme} weights ({human(size)}) in {self.directory} for faster "
                  f"loads ({SWITCH_VARIABLE}=0 turns this off)", file=sys.stderr, flush=True)
        return CacheWriter(self, modules, temp)


class CacheWriter:
    """Writes one entry: a safetensors file per layer into a temporary directory as soon as the
    layer's quantised modules are complete, then the manifest, then one rename into place.

    Any failure (disk full, ...) abandons the entry with one warning: the load goes on. Use as a
    context manager, or call :meth:`close`: whatever was not committed is removed.
    """

    def __init__(self, cache: QuantCache, modules: dict[str, Any], temp: Path):
        self.cache, self.modules, self.temp = cache, modules, temp
        self.groups: dict[str, list[str]] = {}
        for name in modules:
            self.groups.setdefault(_group(name), []).append(name)
        self.files: dict[str, dict[str, Any]] = {}
        self.failed = False

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write_ready(self, complete: set[str]) -> None:
        """Write every layer not yet written whose modules are all in ``complete``."""
        for group, names in self.groups.items():
            if self.failed or group + ".safetensors" in self.files or not all(n in complete for n in names):
                continue
            self._guard(self._write, group, names)

    def _write(self, group: str, names: list[str]) -> None:
        from safetensors.torch import save_file

        # One layer at a time on the host (a no-op copy on the CPU): never the whole model.
        tensors = {name: tensor.detach().to("cpu").contiguous()
                   for name, tensor in module_tensors({n: self.modules[n] for n in names}).items()}
        file = group + ".safetensors"
        save_file(tensors, str(self.temp / file))
        self.files[file] = {"bytes": (self.temp / file).stat().st_size,
                            "tensors": {name: _describe(t) for name, t in tensors.items()}}

    def commit(self) -> bool:
        """Write the manifest and move the entry into place; whether it is now there."""
        if self.failed or len(self.files) != len(self.groups):
            return False
        return bool(self._guard(self._commit))

    def _commit(self) -> bool:
        from diffgen import __version__

        manifest = {"key": self.cache.key.fields(), "label": self.cache.key.label, "diffgen": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "bytes": sum(entry["bytes"] for entry in self.files.values()), "files": self.files}
        (self.temp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        target = self.cache.directory
        if target.exists() and self.cache.stale:
            # Move the unusable entry aside first: a rename cannot replace a non-empty directory.
            aside = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}old-", dir=self.cache.root))
            os.replace(target, aside / "entry")
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(self.temp, target)
        except OSError:
            if not (target / MANIFEST).is_file():
                raise
            return False  # a concurrent run put the same entry in place first; keep theirs
        return True

    def close(self) -> None:
        """Remove the temporary directory if it is still there (not committed)."""
        shutil.rmtree(self.temp, ignore_errors=True)

    def _guard(self, action: Callable[..., Any], *args: Any) -> Any:
        try:
            return action(*args)
        except Exception as exc:  # noqa: BLE001 - the cache never fails a load
            self.failed = True
            self.close()
            reason = getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}".splitlines()[0]
            warn(f"could not write the quantised-weights cache in {self.cache.root} ({reason}); "
                 "loading without it", "write")
            return None


def _remove_stale_temporaries(root: Path) -> None:
    """Remove temporary directories left by runs that died more than :data:`STALE_AFTER_S` ago."""
    cutoff = time.time() - STALE_AFTER_S
    for path in root.glob(_TEMP_PREFIX + "*"):
        try:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
