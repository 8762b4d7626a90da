"""Checking and loading a checkpoint under a plan.

Where a checkpoint is (a local directory, or a Hub id through the Hugging Face cache) is
:mod:`diffgen.loading.hub`'s job; its names are re-exported here for callers of the loader.
Whatever the source, the loader checks the directory before handing it to transformers, so a
wrong directory, pickled weights or a missing tokenizer get one clear error instead of a
traceback. Remote code is never trusted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffgen.errors import NotACheckpointError, TokenizerMissingError, UnsafeCheckpointError
from diffgen.loading.hub import (  # noqa: F401 - re-exported: the loader's callers resolve through it
    DEFAULT_MODEL,
    HUB_ALLOW_PATTERNS,
    MODEL_TYPE,
    Checkpoint,
    env_offline,
    pull,
    read_config,
    resolve,
    resolve_config,
)
from diffgen.planning.plan import LoadPlan
from diffgen.settings import GenerationSettings

if TYPE_CHECKING:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerBase

    from diffgen.loading.prequant import Format

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


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

    model: DiffusionGemmaForBlockDiffusion
    tokenizer: PreTrainedTokenizerBase
    defaults: GenerationSettings
    checkpoint: Checkpoint
    plan: LoadPlan


def inspect_checkpoint(path: Path, name: str | None = None, *, config: dict[str, Any] | None = None,
                       from_hub: bool = False) -> dict[str, Any]:
    """Check that ``path`` holds a loadable DiffusionGemma checkpoint (whole weight files included);
    return its config.json (``config``: the one already read, not read again)."""
    label = name or str(path)
    config = read_config(path, label) if config is None else config
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


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (local files only; remote code never trusted). Missing or broken
    tokenizer files are a :class:`TokenizerMissingError` naming them."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise TokenizerMissingError(f"{path} has no tokenizer.json (nor tokenizer.model)",
                                    "copy the tokenizer files of the original checkpoint into it")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises ValueError, JSONDecodeError, OSError, ...
        name = "tokenizer.json" if (path / "tokenizer.json").is_file() else "tokenizer.model"
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise TokenizerMissingError(f"{path / name} cannot be read ({type(exc).__name__}: {reason})",
                                    "it is damaged: copy it again from the original checkpoint") from exc


def load_checkpoint(checkpoint: Checkpoint, plan: LoadPlan, *, progress: bool = True,
                    tokenizer: PreTrainedTokenizerBase | None = None, config: dict[str, Any] | None = None,
                    defaults: GenerationSettings | None = None) -> LoadedModel:
    """Check and load a resolved checkpoint directory; ``progress`` shows a progress bar.

    Unquantised plans load through transformers' ``from_pretrained``, with diffgen's experts
    forward (:func:`diffgen.kernels.bf16_experts.grouped_experts_forward`: transformers' ``grouped_mm``
    experts where torch's grouped kernel runs, diffgen's Triton kernel where torch would take its
    host-syncing fallback, e.g. compute capability 8.x and 12.x); quantised ones through
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
    fmt, keys = check_complete(path, config, checkpoint.name)
    if fmt is not None:
        plan = prequantised_plan(plan, fmt, checkpoint.name)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    from safetensors import SafetensorError

    try:
        if fmt is not None:
            from diffgen.loading.streaming import load_quantized

            model = load_quantized(path, plan, progress=progress, fmt=fmt, keys=keys)
        elif plan.quant != "none":
            from diffgen.loading.streaming import load_quantized

            model = load_quantized(path, plan, progress=progress)
        else:
            from diffgen.kernels.bf16_experts import register_experts_implementation

            experts = register_experts_implementation()
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(
                path,
                dtype=plan.torch_dtype,
                device_map=_device_map(plan),
                use_safetensors=True,
                local_files_only=True,
                **({"experts_implementation": experts} if experts else {}),
            )
    except SafetensorError as exc:  # damage the header check cannot see
        from diffgen.errors import DamagedCheckpointError

        raise DamagedCheckpointError(f"the weights of {checkpoint.name} are damaged ({exc})",
                                     "download or copy the checkpoint again (`diffgen pull` for a Hub id)") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, defaults=defaults, checkpoint=checkpoint, plan=plan)


def check_complete(path: Path, config: dict[str, Any], label: str
                   ) -> tuple[Format | None, dict[str, tuple[str, list[int]]]]:
    """Refuse, from config.json, ``hf_quant_config.json`` and the shards' headers and before the model
    is built, a checkpoint that does not fill the model whole (:mod:`diffgen.loading.layout`) or
    whose quantised tensors are not what its format says (:mod:`diffgen.loading.prequant`); warn
    about tensors the model has no place for. Returns ``(format or None, the shards' tensors)``."""
    from diffgen.loading import layout, prequant
    from diffgen.loading.shards import shard_files

    fmt = prequant.detect(config, path, label)
    keys = layout.read_headers(shard_files(path))
    needs = layout.model_needs(config)
    layout.check(keys, needs, label=label, fmt=fmt)
    if fmt is not None:
        prequant.validate(fmt, needs, keys, label)
    return fmt, keys


def prequantised_plan(plan: LoadPlan, fmt: Format, label: str) -> LoadPlan:
    """The plan for a pre-quantised checkpoint: its own scheme (a plan made without it, e.g.
    ``LoadPlan("cpu", "float32")`` from a library caller, takes it); any other is refused."""
    from dataclasses import replace

    from diffgen.errors import UsageError

    if plan.quant in ("none", fmt.scheme) and not plan.offload_bytes:
        return replace(plan, quant=fmt.scheme, stored=fmt.label)
    raise UsageError(f"{label} is already quantised ({fmt.label}); it loads as --quant {fmt.scheme} only",
                     f"pass --quant {fmt.scheme} or leave --quant at auto")


def _device_map(plan: LoadPlan) -> dict[str, str]:
    """Everything on the plan's device, or the plan's offload map (layer pairs kept together)."""
    return dict(plan.device_map) if plan.device_map else {"": plan.device}


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (ties included)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.device, tensor.data_ptr())
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
