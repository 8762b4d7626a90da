"""``prepare()``: from a model name to a checkpoint, its settings and the plan that fits this machine.

A library caller plans and loads without the CLI::

    from diffgen.loading.prepare import prepare, load_prepared
    prepared = prepare("google/diffusiongemma-26B-A4B-it", offline=False, quant="auto")
    loaded = load_prepared(prepared)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from diffgen.errors import UsageError


def plan_load(config: dict, *, device: str, quant: str, max_memory: Optional[str], offload: bool,
              batch: int = 1) -> Any:
    """Choose the load plan for this machine from the config alone (see :mod:`diffgen.planning.plan`)."""
    from diffgen.planning import hardware
    from diffgen.planning import plan

    if quant not in plan.QUANT_CHOICES:
        raise UsageError(f"--quant {quant!r}: use one of {', '.join(plan.QUANT_CHOICES)}")
    device_name, dtype = plan.device_dtype(device)
    profile = hardware.detect()
    budget = plan.parse_size(max_memory) if max_memory else _device_budget(profile, device_name)
    counts = plan.count_parameters(config)
    text = config.get("text_config", config)
    context = min(plan.DEFAULT_CONTEXT, int(text.get("max_position_embeddings", plan.DEFAULT_CONTEXT)))
    table = plan.estimates(config, counts, device=device_name, dtype=dtype, budget=budget, hardware=profile,
                           context=context, batch=batch)
    chosen = plan.choose(table, quant, budget, offload=offload)
    return plan.make_plan(chosen, device_name, dtype, budget, counts), chosen, budget


def _device_budget(profile: Any, device: str) -> int:
    for candidate in profile.devices:
        if candidate.device == device:
            return candidate.usable
    return profile.devices[0].usable


@dataclass(frozen=True)
class Prepared:
    """A checkpoint ready to load: where it is, the settings, and the plan that fits this machine."""

    checkpoint: Any
    config: dict
    settings: Any
    plan: Any
    chosen: Any
    budget: int


def prepare(model: str, *, offline: bool, device: str = "auto", quant: str = "auto", max_memory: Optional[str] = None,
            offload: bool = False, batch: int = 1, **flags: Any) -> Prepared:
    """Plan from config.json first, then fetch the checkpoint, then build the settings.

    For a Hub id that is not downloaded yet only config.json is fetched before the plan, so a
    model that cannot fit is refused before a 50 GB download, not after. ``flags`` are the
    generation flags by their settings names (``None`` keeps the checkpoint's default); invalid
    values raise before any weights are read.
    """
    from diffgen.loading import hub, loader

    _, config = hub.resolve_config(model, offline=offline)
    load_plan, chosen, budget = plan_load(config, device=device, quant=quant, max_memory=max_memory,
                                          offload=offload, batch=batch)
    checkpoint = hub.resolve(model, offline=offline)
    config = loader.inspect_checkpoint(checkpoint.path, model)
    settings = loader.read_defaults(checkpoint.path, config).replace(**flags)
    return Prepared(checkpoint, config, settings, load_plan, chosen, budget)


def auto_batch_rows(prepared: Prepared) -> int:
    """``--batch-size auto``: the most rows whose runtime fits beside the chosen scheme's weights."""
    from diffgen.planning import plan

    text = prepared.config.get("text_config", prepared.config)
    context = min(plan.DEFAULT_CONTEXT, int(text.get("max_position_embeddings", plan.DEFAULT_CONTEXT)))
    return plan.rows_that_fit(prepared.config, prepared.chosen, dtype=prepared.plan.dtype, budget=prepared.budget,
                              device=prepared.plan.device, context=context)


def load_prepared(prepared: Prepared, *, progress: bool = False, tokenizer: Any = None) -> Any:
    """Load the prepared checkpoint under its plan; returns a :class:`~diffgen.loading.loader.LoadedModel`."""
    from diffgen.loading import loader

    return loader.load_checkpoint(prepared.checkpoint, prepared.plan, progress=progress, tokenizer=tokenizer)
