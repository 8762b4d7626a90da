"""Where a checkpoint is: a local directory, or a Hugging Face Hub id through the cache.

``--model`` names a local directory or a Hub id. The rule, so that a typo never turns into a
network round trip:

* an existing directory is a local checkpoint, however it is written (``ckpt``, ``./ckpt``,
  ``org/name`` when such a directory exists here);
* otherwise ``org/name`` is a Hub id, resolved through the Hugging Face cache (``HF_HOME`` /
  ``HF_HUB_CACHE``), downloading only safetensors weights, configs and tokenizer files;
* anything else (one word, a path with ``./`` or ``/`` or more than one slash) is a missing
  local directory.

Offline (``--offline`` or ``HF_HUB_OFFLINE=1``) a Hub id resolves from the cache alone. Online,
whatever is not in the cache starts with one short request for the model's config.json that
is never retried (:func:`probe`): huggingface_hub retries network errors five times with
backoff (about 25 s, a warning per try) before it reports a bare ``LocalEntryNotFoundError``,
so diffgen asks once itself and, when the Hub cannot be reached, falls back to the cache or
says in one line what to do. The libraries' log lines and warnings are silenced unless
``DIFFGEN_DEBUG=1``. Remote code is never trusted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffgen.errors import HubUnreachableError, ModelNotFoundError, NotACheckpointError

DEFAULT_MODEL = "google/diffusiongemma-26B-A4B-it"
MODEL_TYPE = "diffusion_gemma"
# What a Hub download fetches: never pickled weights.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
# Everything but the weights (configs, hf_quant_config.json, the shard index, the tokenizer, the template).
HUB_FILE_PATTERNS = [p for p in HUB_ALLOW_PATTERNS if p != "*.safetensors"]
INDEX = "model.safetensors.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Seconds the one reachability request may take (HF_HUB_ETAG_TIMEOUT overrides): a Hub that
# answers at all answers a HEAD in well under a second.
PROBE_TIMEOUT = 5.0
# Loggers of the libraries a Hub call goes through; silenced unless DIFFGEN_DEBUG=1.
NOISY_LOGGERS = ("huggingface_hub", "httpx", "httpx2", "httpcore", "urllib3", "filelock")


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint.

    Attributes:
        name: the name as the user gave it.
        path: the local directory holding it (absolute).
        from_hub: whether it came through the Hugging Face cache.
    """

    name: str
    path: Path
    from_hub: bool


def env_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for offline mode (read now, not at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _debug() -> bool:
    return os.environ.get("DIFFGEN_DEBUG", "").strip() not in {"", "0"}


def is_hub_id(name: str) -> bool:
    """``org/name`` and not an existing path: what resolves through the Hub cache."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def offline_hint(repo_id: str) -> str:
    """What to do when a Hub id cannot be had: the three ways out, in one line."""
    return (f"run `diffgen pull {repo_id}` where there is a network, pass --offline once the cache holds it, "
            "or -m ./dir for a local checkpoint")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence huggingface_hub / httpx / urllib3 logging and Python warnings for the block,
    unless ``DIFFGEN_DEBUG=1``: diffgen says what went wrong in its own one line."""
    if _debug():
        yield
        return
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def offline_mode(offline: bool = True) -> Iterator[None]:
    """huggingface_hub in offline mode for the block (no-op when ``offline`` is false).

    ``local_files_only=True`` alone is not enough: huggingface_hub reads ``HF_HUB_OFFLINE`` once,
    at import, and while building its user-agent it still fetches a registry from the Hub
    unless that constant is set. ``--offline`` promises no request at all, so set it here.
    """
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def resolve(name: str, *, offline: bool = False) -> Checkpoint:
    """Find the checkpoint directory for ``name`` (a local directory or a Hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return Checkpoint(name, path.resolve(), from_hub=False)
    _check_name(name, path)
    return Checkpoint(name, _from_hub(name, offline=offline or env_offline()), from_hub=True)


def _check_name(name: str, path: Path) -> None:
    """Raise for a name that is neither an existing directory nor a Hub id."""
    if path.exists():
        raise NotACheckpointError(f"{name} is a file, not a checkpoint directory",
                                  "pass the directory that holds config.json")
    if not _HUB_ID.match(name):
        raise ModelNotFoundError(f"no directory {name}",
                                 f"check the path, or give a Hub id as org/name such as {DEFAULT_MODEL}")


def resolve_config(name: str, *, offline: bool = False) -> tuple[str, dict[str, Any]]:
    """``(where, config)`` for ``name`` from its config.json alone: a local directory (which may
    hold nothing else), a Hub snapshot in the cache, or — online — just config.json from the Hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve()), read_config(path.resolve(), name)
    _check_name(name, path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = offline or env_offline()
    with quiet_libraries():
        try:
            with offline_mode():  # a look in the cache only, online or not
                file = hf_hub_download(name, "config.json", local_files_only=True)
        except LocalEntryNotFoundError:
            if offline:
                raise HubUnreachableError(f"{name} is not in the Hugging Face cache and offline mode is on",
                                          offline_hint(name)) from None
            probe(name)
            try:
                file = hf_hub_download(name, "config.json")
            except Exception as exc:  # noqa: BLE001 - the probe answered, so this is the Hub failing mid-way
                raise HubUnreachableError(f"could not fetch {name}/config.json from the Hub ({_reason(exc)})",
                                          offline_hint(name)) from exc
    return name, read_config(Path(file).parent, name)


def read_config(path: Path, label: str) -> dict[str, Any]:
    """The parsed config.json of a DiffusionGemma checkpoint directory (no weights read)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise NotACheckpointError(f"{label} has no config.json, so it is not a model checkpoint",
                                  "pass the directory that holds config.json and the weights")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NotACheckpointError(f"{label}/config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise NotACheckpointError(f"{label}/config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise NotACheckpointError(f"{label} is a {model_type or 'unknown'} checkpoint, not a DiffusionGemma one",
                                  f"diffgen runs model_type {MODEL_TYPE!r} checkpoints such as {DEFAULT_MODEL}")
    return config


def pull(repo_id: str, *, offline: bool = False, revision: str | None = None) -> Path:
    """Download a checkpoint's safe files into the Hugging Face cache (resumable); return its path."""
    if not is_hub_id(repo_id):
        raise ModelNotFoundError(f"{repo_id} is not a Hub id", "pull takes an id such as " + DEFAULT_MODEL)
    return _from_hub(repo_id, offline=offline or env_offline(), revision=revision, pulling=True)


def needed_weights(snapshot: Path) -> list[str]:
    """The weight files a snapshot needs: those its shard index names (so a repository that also
    holds other safetensors — a consolidated copy, an ``original/`` folder — costs nothing more),
    else every ``*.safetensors``."""
    index = snapshot / INDEX
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # a damaged index: fetch every weight file; the load reports the index
    return ["*.safetensors"]


def _download(repo_id: str, revision: str | None) -> Path:
    """Download a snapshot: first everything but the weights, then only the weight files it needs."""
    from huggingface_hub import snapshot_download

    files = Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS, revision=revision))
    return Path(snapshot_download(repo_id, allow_patterns=needed_weights(files), revision=revision))


def probe(repo_id: str, revision: str | None = None) -> None:
    """Ask the Hub once, with a short timeout and no retry, for ``repo_id``'s config.json.

    Returns when the Hub answered that it has it; raises :class:`HubUnreachableError` when it
    could not be reached (network down, DNS, proxy, a closed ``HF_ENDPOINT``, 5xx), and
    :class:`ModelNotFoundError` / :class:`NotACheckpointError` when it answered no.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    timeout = PROBE_TIMEOUT
    if os.environ.get("HF_HUB_ETAG_TIMEOUT", "").strip().isdigit():
        timeout = float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    url = hf_hub_url(repo_id, "config.json", revision=revision)
    with quiet_libraries():
        try:
            get_hf_file_metadata(url, timeout=timeout)
        except GatedRepoError as exc:
            raise ModelNotFoundError(f"{repo_id} is gated on the Hub and this machine has no access",
                                     "accept its licence on the model page, then run `hf auth login`") from exc
        except RepositoryNotFoundError as exc:
            raise ModelNotFoundError(f"model {repo_id} was not found on the Hub",
                                     "check the name (org/name), or pass a local checkpoint directory") from exc
        except RevisionNotFoundError as exc:
            raise ModelNotFoundError(f"{repo_id} has no revision {revision or 'main'} on the Hub",
                                     "check --revision") from exc
        except RemoteEntryNotFoundError as exc:
            raise NotACheckpointError(f"{repo_id} on the Hub has no config.json, so it is not a model checkpoint",
                                      f"diffgen runs DiffusionGemma checkpoints such as {DEFAULT_MODEL}") from exc
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            raise HubUnreachableError(f"the Hugging Face Hub ({constants.ENDPOINT}) answered HTTP {status}",
                                      offline_hint(repo_id)) from exc
        except Exception as exc:  # noqa: BLE001 - every transport failure (httpx's or an OSError) means the same
            raise HubUnreachableError(f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached "
                                      f"({_reason(exc)}) and {repo_id} is not in the cache",
                                      offline_hint(repo_id)) from exc


def _reason(exc: BaseException) -> str:
    """A short reason for a transport failure, e.g. ``[Errno 111] Connection refused``."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return (text[:100] + "…" if len(text) > 100 else text) or type(exc).__name__


def _from_hub(repo_id: str, *, offline: bool, revision: str | None = None, pulling: bool = False) -> Path:
    """The snapshot directory of ``repo_id``: from the cache offline; online, downloaded or
    updated after one :func:`probe`, and from the cache when the probe finds no network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    def cached() -> Path:
        with offline_mode():
            return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True,
                                          revision=revision))

    with quiet_libraries():
        if offline:
            try:
                return cached()
            except LocalEntryNotFoundError as exc:
                hint = ("run it again without --offline / HF_HUB_OFFLINE where there is a network" if pulling
                        else offline_hint(repo_id))
                raise HubUnreachableError(f"{repo_id} is not in the Hugging Face cache and offline mode is on",
                                          hint) from exc
        try:
            probe(repo_id, revision)
        except HubUnreachableError as unreachable:
            if pulling:
                raise HubUnreachableError(unreachable.message.replace(f" and {repo_id} is not in the cache", ""),
                                          "pull needs a network; or pass -m ./dir to run a local checkpoint") from None
            try:
                return cached()  # no network, but a complete snapshot: use it, as huggingface_hub would
            except LocalEntryNotFoundError:
                raise unreachable from None
        try:
            return _download(repo_id, revision)
        except GatedRepoError as exc:
            raise ModelNotFoundError(f"{repo_id} is gated on the Hub and this machine has no access",
                                     "accept its licence on the model page, then run `hf auth login`") from exc
        except RepositoryNotFoundError as exc:
            raise ModelNotFoundError(f"model {repo_id} was not found on the Hub",
                                     "check the name, or pass a local checkpoint directory") from exc
        except LocalEntryNotFoundError as exc:  # the network went away between the probe and the download
            raise HubUnreachableError(f"the download of {repo_id} stopped: the Hub could not be reached "
                                      f"({_reason(exc.__cause__ or exc)})",
                                      f"run `diffgen pull {repo_id}` again to resume it") from exc
        except HfHubHTTPError as exc:
            raise HubUnreachableError(f"the Hub refused to serve {repo_id}: {_reason(exc)}",
                                      "try again later, or pass a local checkpoint directory") from exc
        except Exception as exc:  # noqa: BLE001 - a transport failure mid-download (httpx's own types)
            raise HubUnreachableError(f"the download of {repo_id} stopped ({_reason(exc)})",
                                      f"run `diffgen pull {repo_id}` again to resume it") from exc
