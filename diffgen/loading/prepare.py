"""``prepare()``: from a model name to a checkpoint, its settings and the plan that fits this machine.

A library caller plans and loads without the CLI::

    from diffgen.loading.prepare import prepare, load_prepared
    prepared = prepare("google/diffusiongemma-26B-A4B-it", offline=False, quant="auto")
    loaded = load_prepared(prepared)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from diffgen.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from diffgen.loading.hub import Checkpoint
    from diffgen.loading.loader import LoadedModel
    from diffgen.loading.prequant import Format
    from diffgen.planning.hardware import HardwareProfile
    from diffgen.planning.plan import Estimate, LoadPlan
    from diffgen.settings import GenerationSettings


@dataclass(frozen=True)
class Machine:
    """Where a load is planned. Attributes: ``device`` (``cpu``, ``cuda:0``, ``mps``), ``dtype`` its
    default (``float32``, ``bfloat16``...), ``profile`` the :class:`~diffgen.planning.hardware.HardwareProfile`,
    ``budget`` the usable bytes (measured, or ``--max-memory``)."""

    device: str
    dtype: str
    profile: HardwareProfile
    budget: int


def machine(*, device: str, quant: str, max_memory: Optional[str]) -> Machine:
    """The device, its dtype and memory budget; refuses a ``--quant`` the device cannot run and a
    ``--max-memory`` that is not a size. Reads no checkpoint."""
    from diffgen.planning import hardware
    from diffgen.planning import plan
    if quant not in plan.QUANT_CHOICES:
        raise UsageError(f"--quant {quant!r}: use one of {', '.join(plan.QUANT_CHOICES)}")
    budget = plan.parse_size(max_memory) if max_memory else None
    device_name, dtype = plan.device_dtype(device)
    profile = hardware.detect()
    plan.check_scheme(quant, device_name, dtype, profile)
    return Machine(device_name, dtype, profile, budget if budget is not None else _device_budget(profile, device_name))


def plan_load(config: dict, *, device: str, quant: str, max_memory: Optional[str], offload: bool,
              batch: int = 1, where: Optional[Machine] = None, images: int = 0, fmt: Optional[Format] = None,
              label: str = "the checkpoint") -> tuple[LoadPlan, Estimate, int]:
    """Choose the load plan for this machine from the config alone (see :mod:`diffgen.planning.plan`);
    ``images`` per generation add their tokens to the planned context and the vision workspace.

    ``fmt``: the checkpoint's pre-quantised format (:func:`diffgen.loading.prequant.detect`): it
    loads in that scheme only, and a ``--quant`` naming another is refused in one line.
    """
    from diffgen.planning import plan, sizes
    where = where or machine(device=device, quant=quant, max_memory=max_memory)
    if fmt is not None and quant not in ("auto", fmt.scheme):
        raise UsageError(f"{label} is already quantised ({fmt.label}): --quant {quant} cannot apply to it",
                         f"leave --quant at auto or pass --quant {fmt.scheme}; to quantise another way start from "
                         f"the bf16 checkpoint", retry=(("--quant", fmt.scheme),))
    counts = sizes.count_parameters(config)
    text = config.get("text_config", config)
    context = min(sizes.DEFAULT_CONTEXT + sizes.image_context(images),
                  int(text.get("max_position_embeddings", sizes.DEFAULT_CONTEXT)))
    only = fmt.scheme if fmt is not None else None
    linears = fmt.scheme if fmt is not None and fmt.linears else None
    table = plan.estimates(config, counts, device=where.device, dtype=where.dtype, budget=where.budget,
                           hardware=where.profile, context=context, batch=batch, images=images, only=only,
                           linears=linears)
    if fmt is not None and not table[0].available:
        raise UsageError(f"{label} is a {fmt.label} checkpoint, which cannot run on {where.device}: {table[0].why}",
                         f"use the NVFP4 checkpoint {dict(plan.PUBLISHED)['nvfp4']}, which runs on any CUDA card "
                         "from sm80 up, on a DGX Spark and on the CPU")
    chosen = plan.choose(table, only or quant, where.budget, offload=offload and fmt is None,
                         can_offload=where.device.startswith("cuda") and fmt is None)
    if fmt is None and quant == "auto" and chosen.scheme in ("nvfp4", "nf4", "nf4-all"):
        _note_published(table, label)
    load_plan = plan.make_plan(chosen, where.device, where.dtype, where.budget, counts)
    if fmt is not None:
        from dataclasses import replace

        load_plan = replace(load_plan, stored=fmt.label)
    return load_plan, chosen, where.budget


def _note_published(table: list, label: str) -> None:
    """When ``auto`` quantises the bf16 checkpoint to 4 bits because nothing wider fits, say (on
    stderr, before anything is downloaded) that the published 4-bit checkpoint holds the same
    experts ready: a 19 GB download instead of 52."""
    import sys

    from diffgen.loading.hub import DEFAULT_MODEL
    from diffgen.planning import plan
    if label != DEFAULT_MODEL:
        return
    repo = dict(plan.PUBLISHED)["nvfp4"]
    print(f"diffgen: note: bf16 does not fit here, so auto quantises {label} to 4 bits after loading all of it; "
          f"{repo} is the same model with its experts already in NVFP4 (an 18.9 GB download instead of 52 GB): "
          f"-m {repo}", file=sys.stderr, flush=True)


def _device_budget(profile: HardwareProfile, device: str) -> int:
    for candidate in profile.devices:
        if candidate.device == device:
            return candidate.usable
    return profile.devices[0].usable


@dataclass(frozen=True)
class Prepared:
    """A checkpoint ready to load.

    Attributes: ``checkpoint`` where it is; ``config`` its parsed config.json (read once, passed
    on); ``settings`` the generation settings (checkpoint defaults + flags); ``plan``/``chosen``/
    ``budget`` the plan that fits this machine; ``defaults`` the checkpoint's own settings.
    """

    checkpoint: Checkpoint
    config: dict
    settings: GenerationSettings
    plan: LoadPlan
    chosen: Estimate
    budget: int
    defaults: Optional[GenerationSettings] = None


def prepare(model: str, *, offline: bool, device: str = "auto", quant: str = "auto", max_memory: Optional[str] = None,
            offload: bool = False, batch: int = 1, images: int = 0, **flags: Any) -> Prepared:
    """Check the flags, plan from config.json, then fetch the checkpoint, then build the settings.

    ``flags`` are the generation settings by field name (``None`` keeps the checkpoint's
    default), ``seed`` included. Each is checked before anything is read, and the device can run
    the scheme; for a Hub id that is not downloaded yet only config.json is fetched before the
    plan, so a model that cannot fit is refused before a 50 GB download, not after. config.json
    is read once. ``images``: images per generation, planned for (see :func:`plan_load`).
    """
    from diffgen.loading import hub, loader
    from diffgen.settings import check_flags

    check_flags(**flags)
    where = machine(device=device, quant=quant, max_memory=max_memory)
    location, config = hub.resolve_config(model, offline=offline)
    fmt = checkpoint_format(location, config, model)
    load_plan, chosen, budget = plan_load(config, device=device, quant=quant, max_memory=max_memory,
                                          offload=offload, batch=batch, where=where, images=images, fmt=fmt,
                                          label=model)
    checkpoint = hub.resolve(model, offline=offline)
    loader.inspect_checkpoint(checkpoint.path, model, config=config, from_hub=checkpoint.from_hub)
    defaults = loader.read_defaults(checkpoint.path, config)
    settings = defaults.replace(**flags)
    return Prepared(checkpoint, config, settings, load_plan, chosen, budget, defaults)


def checkpoint_format(location: str, config: dict, label: str) -> Optional[Format]:
    """The pre-quantised format of the checkpoint whose config.json was read from ``location`` (a
    local directory, whose ``hf_quant_config.json`` is read too, or a Hub id), or ``None``."""
    from pathlib import Path

    from diffgen.loading import prequant

    path = Path(location)
    return prequant.detect(config, path if path.is_dir() else None, label)


def auto_batch_rows(prepared: Prepared) -> int:
    """``--batch-size auto``: the most rows whose runtime fits beside the chosen scheme's weights."""
    from diffgen.planning import plan, sizes
    text = prepared.config.get("text_config", prepared.config)
    context = min(sizes.DEFAULT_CONTEXT, int(text.get("max_position_embeddings", sizes.DEFAULT_CONTEXT)))
    return plan.rows_that_fit(prepared.config, prepared.chosen, dtype=prepared.plan.dtype, budget=prepared.budget,
                              device=prepared.plan.device, context=context)


def load_prepared(prepared: Prepared, *, progress: bool = False,
                  tokenizer: Optional[PreTrainedTokenizerBase] = None) -> LoadedModel:
    """Load the prepared checkpoint under its plan; returns a :class:`~diffgen.loading.loader.LoadedModel`."""
    from diffgen.loading import loader

    return loader.load_checkpoint(prepared.checkpoint, prepared.plan, progress=progress, tokenizer=tokenizer,
                                  config=prepared.config, defaults=prepared.defaults)
