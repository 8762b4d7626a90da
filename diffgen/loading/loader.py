"""Checkpoint resolution and loading under a plan.

``--model`` names a local directory or a Hugging Face Hub id. A Hub id resolves through the
Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), downloading only safetensors weights,
configs and tokenizer files; offline (``--offline`` or ``HF_HUB_OFFLINE=1``) it resolves from
the cache alone. Whatever the source, the loader checks the directory before handing it to
transformers, so a wrong directory, pickled weights or a missing tokenizer get one clear
error instead of a traceback. Remote code is never trusted.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffgen.errors import (
    HubUnreachableError,
    ModelNotFoundError,
    NotACheckpointError,
    TokenizerMissingError,
    UnsafeCheckpointError,
)
from diffgen.planning.plan import LoadPlan
from diffgen.settings import GenerationSettings

DEFAULT_MODEL = "google/diffusiongemma-26B-A4B-it"
MODEL_TYPE = "diffusion_gemma"
# What a Hub download fetches: never pickled weights.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint. Attributes: ``name`` as the user gave it; ``path`` the local
    directory holding it; ``from_hub`` whether it came through the Hugging Face cache."""

    name: str
    path: Path
    from_hub: bool


@dataclass
class LoadedModel:
    """A model ready to generate.

    Attributes:
        model: the ``DiffusionGemmaForBlockDiffusion``, in eval mode on ``plan.device``.
        tokenizer: its tokenizer (with the chat template when the checkpoint has one).
        defaults: generation settings from the checkpoint's ``generation_config.json``.
        checkpoint: where it came from.
        plan: how it was loaded.
    """

    model: Any
    tokenizer: Any
    defaults: GenerationSettings
    checkpoint: Checkpoint
    plan: LoadPlan


def env_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for offline mode (read now, not at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(name: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else with a path shape is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve(name: str, *, offline: bool = False) -> Checkpoint:
    """Find the checkpoint directory for ``name`` (a local directory or a Hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return Checkpoint(name, path.resolve(), from_hub=False)
    if path.exists():
        raise NotACheckpointError(f"{name} is a file, not a checkpoint directory",
                                  "pass the directory that holds config.json")
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise ModelNotFoundError(f"no directory {name}",
                                 "check the path, or give a Hub id such as " + DEFAULT_MODEL)
    return Checkpoint(name, _from_hub(name, offline=offline or env_offline()), from_hub=True)


def resolve_config(name: str, *, offline: bool = False) -> tuple[str, dict[str, Any]]:
    """``(where, config)`` for ``name`` from its config.json alone: a local directory (which may
    hold nothing else), a Hub snapshot in the cache, or — online — just config.json from the Hub."""
    path = Path(name).expanduser()
    if path.is_dir() or _looks_like_path(name) or not _HUB_ID.match(name):
        checkpoint = resolve(name, offline=True)
        return str(checkpoint.path), _read_config(checkpoint.path, name)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        file = hf_hub_download(name, "config.json", local_files_only=True)
    except LocalEntryNotFoundError:
        if offline or env_offline():
            raise HubUnreachableError(f"{name} is not in the Hugging Face cache and offline mode is on",
                                      "run `diffgen pull` while online, or pass a local directory") from None
        try:
            file = hf_hub_download(name, "config.json")
        except Exception as exc:  # noqa: BLE001 - any Hub failure is reported the same way
            raise HubUnreachableError(f"could not fetch {name}/config.json from the Hub ({type(exc).__name__})",
                                      "check the name and the network") from exc
    return name, _read_config(Path(file).parent, name)


def _read_config(path: Path, label: str) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise NotACheckpointError(f"{label} has no config.json, so it is not a model checkpoint",
                                  "pass the directory that holds config.json and the weights")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NotACheckpointError(f"{label}/config.json is not valid JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise NotACheckpointError(f"{label} is a {model_type or 'unknown'} checkpoint, not a DiffusionGemma one",
                                  f"diffgen runs model_type {MODEL_TYPE!r} checkpoints such as {DEFAULT_MODEL}")
    return config


def pull(repo_id: str, *, offline: bool = False, revision: str | None = None) -> Path:
    """Download a checkpoint's safe files into the Hugging Face cache (resumable); return its path."""
    if Path(repo_id).expanduser().exists() or _looks_like_path(repo_id) or not _HUB_ID.match(repo_id):
        raise ModelNotFoundError(f"{repo_id} is not a Hub id", "pull takes an id such as " + DEFAULT_MODEL)
    return _from_hub(repo_id, offline=offline or env_offline(), revision=revision)


def _from_hub(repo_id: str, *, offline: bool, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline,
                                      revision=revision))
    except GatedRepoError as exc:
        raise ModelNotFoundError(f"{repo_id} is gated on the Hub and this machine has no access",
                                 "accept its licence on the model page, then run `hf auth login`") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"model {repo_id} was not found on the Hub",
                                 "check the name, or pass a local checkpoint directory") from exc
    except LocalEntryNotFoundError as exc:
        if offline:
            raise HubUnreachableError(f"{repo_id} is not in the Hugging Face cache and offline mode is on",
                                      "run once online (without --offline / HF_HUB_OFFLINE) to download it") from exc
        raise HubUnreachableError(f"the Hugging Face Hub could not be reached and {repo_id} is not in the cache",
                                  "check the network, or pass a local checkpoint directory") from exc
    except HfHubHTTPError as exc:
        raise HubUnreachableError(f"the Hub refused to serve {repo_id}: {exc}".splitlines()[0],
                                  "try again later, or pass a local checkpoint directory") from exc


def inspect_checkpoint(path: Path, name: str | None = None, *, config: dict[str, Any] | None = None,
                       from_hub: bool = False) -> dict[str, Any]:
    """Check that ``path`` holds a loadable DiffusionGemma checkpoint (whole weight files included);
    return its config.json (``config``: the one already read, not read again)."""
    label = name or str(path)
    config = _read_config(path, label) if config is None else config
    files = [p.name for p in path.iterdir() if p.is_file()]
    if not any(f.endswith(".safetensors") for f in files):
        pickled = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise UnsafeCheckpointError(
                f"{label} holds only pickled weights ({', '.join(pickled[:3])}), which can run code when loaded",
                "convert them to safetensors first; diffgen loads safetensors only")
        raise NotACheckpointError(f"{label} has no weights (*.safetensors)",
                                  "download the complete checkpoint")
    if not any(f in files for f in TOKENIZER_FILES):
        raise TokenizerMissingError(f"{label} has no tokenizer (tokenizer.json or tokenizer.model)",
                                    "copy the tokenizer files of the original checkpoint into it")
    from diffgen.loading.shards import check_shards

    check_shards(path, label, from_hub=from_hub)
    return config


def read_defaults(path: Path, config: dict[str, Any]) -> GenerationSettings:
    """Generation defaults from ``generation_config.json`` (JSON only: no weights, no torch)."""
    generation_file = path / "generation_config.json"
    generation = None
    if generation_file.is_file():
        try:
            generation = json.loads(generation_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise NotACheckpointError(f"{path}/generation_config.json is not valid JSON ({exc})") from exc
    return GenerationSettings.from_generation_config(generation, config)


def load(name: str, plan: LoadPlan, *, offline: bool = False, progress: bool = True) -> LoadedModel:
    """Resolve, check and load a checkpoint under ``plan``."""
    checkpoint = resolve(name, offline=offline)
    return load_checkpoint(checkpoint, plan, progress=progress)


def load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer (local files only; remote code never trusted)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_checkpoint(checkpoint: Checkpoint, plan: LoadPlan, *, progress: bool = True,
                    tokenizer: Any = None, config: dict[str, Any] | None = None,
                    defaults: GenerationSettings | None = None) -> LoadedModel:
    """Check and load a resolved checkpoint directory; ``progress`` shows a progress bar.

    Unquantised plans load through transformers' ``from_pretrained``; quantised ones through
    :func:`diffgen.loading.streaming.load_quantized`, which quantises tensor by tensor from the shards.
    ``config`` and ``defaults``: a checkpoint already inspected (by ``prepare()``) is not read again.
    """
    if config is None:
        config = inspect_checkpoint(checkpoint.path, checkpoint.name, from_hub=checkpoint.from_hub)
    defaults = read_defaults(checkpoint.path, config) if defaults is None else defaults
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    if not os.environ.get("DIFFGEN_DEBUG"):
        hf_logging.set_verbosity_error()
    if progress:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    path = checkpoint.path
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    from safetensors import SafetensorError

    try:
        if plan.quant != "none":
            from diffgen.loading.streaming import load_quantized

            model = load_quantized(path, plan, progress=progress)
        else:
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(
                path,
                dtype=plan.torch_dtype,
                device_map=_device_map(plan),
                use_safetensors=True,
                local_files_only=True,
            )
    except SafetensorError as exc:  # damage the header check cannot see
        from diffgen.errors import DamagedCheckpointError

        raise DamagedCheckpointError(f"the weights of {checkpoint.name} are damaged ({exc})",
                                     "download or copy the checkpoint again (`diffgen pull` for a Hub id)") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, defaults=defaults, checkpoint=checkpoint, plan=plan)


def _device_map(plan: LoadPlan) -> Any:
    """Everything on the plan's device, or the plan's offload map (layer pairs kept together)."""
    return dict(plan.device_map) if plan.device_map else {"": plan.device}


def resident_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (ties included)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.device, tensor.data_ptr())
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
